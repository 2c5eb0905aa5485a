"""Load any causal LM transformers can: a local directory, a hub name, or a GGUF file.

GGUF files are de-quantized once, saved as safetensors in the cache and loaded from there afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prospect.assets import cache_dir, replace_dir, sha256_of
from prospect.config import ModelConfig
from prospect.errors import UserError, first_line
from prospect.models import attention as segments
from prospect.models.chat_templates import set_chat_template
from prospect.models.default import EMBEDDED, embedded_gguf
from prospect.models.precision import round_to_bf16
from prospect.progress import reporting

log = logging.getLogger(__name__)
# Attributes of a loaded model: the dtype its checkpoint came in, and its name as the user gave it.
SOURCE_DTYPE, GIVEN_NAME = "prospect_source_dtype", "prospect_given_name"
CONVERSION_VERSION = 2  # 2: weights bf16 autocast casts are stored as their bf16 values


def load_model(
    cfg: ModelConfig,
    auto_class: type[AutoModelForCausalLM] | type[AutoModelForSequenceClassification] = AutoModelForCausalLM,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in fp32 (master weights) and its tokenizer, with a pad token set."""
    source = local_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    try:
        model = auto_class.from_pretrained(
            source, dtype=torch.float32, **hub_kwargs(cfg), **attention_kwargs(cfg), **weight_kwargs(cfg)
        )
    except (OSError, ValueError) as exc:
        if not cfg.allow_pickle and pickle_only(source):
            raise UserError(
                f"model '{cfg.name}': its weights are pickle files (.bin), which can run code when "
                "loaded; convert them to safetensors or set model.allow_pickle=true"
            ) from None
        raise UserError(f"model '{cfg.name}': could not load it ({first_line(exc)})") from None
    setattr(model, SOURCE_DTYPE, checkpoint_dtype(source, cfg.revision))
    setattr(model, GIVEN_NAME, given_name(cfg))
    return model, tokenizer


def carry_source(loaded: nn.Module, built: nn.Module) -> None:
    """A model built from a loaded one (a reward model from a causal LM) saves as the loaded one would."""
    for name in (SOURCE_DTYPE, GIVEN_NAME):
        setattr(built, name, getattr(loaded, name))


def checkpoint_dtype(source: str, revision: str | None) -> torch.dtype:
    """The dtype a checkpoint's config.json gives its weights (`dtype`, `torch_dtype` before transformers 5),
    which final/ is saved in; float32 when it names none (and for de-quantized GGUF files)."""
    try:
        config, _ = PretrainedConfig.get_config_dict(source, revision=revision)
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def given_name(cfg: ModelConfig) -> str:
    """The model as the user named it, for a LoRA adapter's base_model_name_or_path and the model card: a hub
    name as given, a local path made absolute, an embedded model's upstream hub name (never the cache)."""
    if cfg.name in EMBEDDED:
        return EMBEDDED[cfg.name].upstream
    path = Path(cfg.name).expanduser()
    return str(path.resolve()) if path.exists() else cfg.name


def prepare_for_training(model: PreTrainedModel, disable_dropout: bool, gradient_checkpointing: bool) -> None:
    """Dropout off (so policy and reference log-probs compare), activation recomputation on if asked."""
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def with_lora(model: PreTrainedModel, cfg: ModelConfig, task_type: str) -> nn.Module:
    """The model wrapped with LoRA adapters (peft) as `model.lora_*` says; only the adapters train."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft annotates int; alpha / r takes a float
        lora_dropout=cfg.lora_dropout,
        task_type=task_type,
        target_modules=targets if targets == "all-linear" else [s.strip() for s in targets.split(",")],
    )
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as exc:  # peft's NoMatchingPeftModuleError is a ValueError
        raise UserError(
            f"model.lora_target_modules={targets}: {first_line(exc)} (names such as q_proj,v_proj, or all-linear)"
        ) from None
    return peft_model


def local_source(cfg: ModelConfig) -> str:
    """A directory or hub name that `from_pretrained` takes; GGUF files are converted (once) first."""
    source, gguf_file = resolve_model_source(cfg)
    return convert_gguf(source, gguf_file) if gguf_file is not None else source


def load_tokenizer(cfg: ModelConfig, source: str) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise UserError(f"model '{cfg.name}': could not load its tokenizer ({first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template)
    return tokenizer


def hub_kwargs(cfg: ModelConfig) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def weight_kwargs(cfg: ModelConfig) -> dict:
    """safetensors only, unless the user allows pickle checkpoints."""
    return {} if cfg.allow_pickle else {"use_safetensors": True}


def attention_kwargs(cfg: ModelConfig) -> dict:
    """'auto' means prospect's segment attention on CPU (eager when no layout is given, as in generation),
    transformers' default elsewhere."""
    attention: str | None = cfg.attn_implementation
    if attention == "auto":
        attention = None if torch.cuda.is_available() else segments.NAME
    return {"attn_implementation": attention}


def looks_local(name: str) -> bool:
    """A path rather than a hub name ('owner/name' has one slash)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def resolve_model_source(cfg: ModelConfig) -> tuple[str, str | None]:
    """(directory or hub name, GGUF file name or None)."""
    if cfg.name in EMBEDDED:
        gguf = embedded_gguf(EMBEDDED[cfg.name])
        return str(gguf.parent), gguf.name
    path = Path(cfg.name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model '{cfg.name}': no such GGUF file")
        return str(path.parent), path.name
    if cfg.gguf_file:
        return cfg.name, cfg.gguf_file
    if not path.exists() and looks_local(cfg.name):
        raise UserError(f"model '{cfg.name}': no such directory (and not a hub name of the form owner/name)")
    if path.exists() and not (path / "config.json").is_file():
        raise UserError(
            f"model '{cfg.name}': directory has no config.json; expected a transformers checkpoint"
        )
    if not path.exists():
        check_hub_reachable(cfg.name, cfg.revision)
    return cfg.name, None


def check_hub_reachable(name: str, revision: str | None) -> None:
    """A hub name that is neither cached nor reachable fails at once, not after a minute of retries."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
    if constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set"
    else:
        parts = urllib.parse.urlsplit(endpoint)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            socket.create_connection((parts.hostname or "", port), timeout=5).close()
            return
        except OSError as exc:
            reason = f"{endpoint} cannot be reached ({exc.strerror or exc})"
    raise UserError(
        f"model '{name}': not a local path and not in the hub cache, and {reason}; pass a local directory "
        "or .gguf file, or download the model where the hub is reachable"
    )


def convert_gguf(source: str, gguf_file: str) -> str:
    """De-quantize a GGUF checkpoint to a safetensors directory in the cache (once per file content). The
    weights bf16 autocast casts are stored as their bf16 values (`round_to_bf16`): de-quantized codes sit on
    bf16 rounding ties, which would turn the first small update of a bf16 run into a jump of whole bf16
    steps. The bf16 forward is the same either way; an fp32 run starts from the rounded values."""
    local = Path(source) / gguf_file
    if local.is_file():
        key = sha256_of(local)[:16]
    else:  # a GGUF file inside a hub repo: fetch it through the hub cache first
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(source, gguf_file))
        key = sha256_of(local)[:16]
    final = cache_dir() / "models" / f"{local.stem}-{key}-v{CONVERSION_VERSION}"
    if (final / "prospect-conversion.json").is_file():
        return str(final)
    log.info("converting %s to safetensors (once) in %s", local.name, final)
    tokenizer = AutoTokenizer.from_pretrained(str(local.parent), gguf_file=local.name)
    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    with reporting(gguf_loader, f"de-quantizing {local.name} (once)", "tensors"):
        model = AutoModelForCausalLM.from_pretrained(
            str(local.parent), gguf_file=local.name, dtype=torch.float32
        )
    detach_quantizer(model)
    rounded = round_to_bf16(model)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final.parent.glob(f".{final.name}.*"):  # a conversion killed half way
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    check_saved_weights(model, tmp)
    record = {
        "gguf": local.name,
        "sha256_prefix": key,
        "version": CONVERSION_VERSION,
        "bf16_rounded": rounded,
    }
    (tmp / "prospect-conversion.json").write_text(json.dumps(record))
    replace_dir(tmp, final)
    return str(final)


def detach_quantizer(model: PreTrainedModel) -> None:
    """A GGUF-loaded model holds de-quantized fp32 weights but still carries the quantizer, which blocks
    `save_pretrained`. Drop it, as transformers does after a `dequantize`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def check_saved_weights(model: PreTrainedModel, directory: Path) -> None:
    """Every tensor in the saved safetensors equals the loaded one; every parameter is saved or tied."""
    saved: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        saved.update(load_file(shard))
    state = model.state_dict()
    for name, tensor in saved.items():
        if name not in state or not torch.equal(state[name], tensor):
            raise RuntimeError(f"converted checkpoint differs from the loaded model at {name}")
    missing = set(state) - set(saved)
    tied = {name for name in missing if any(state[name].data_ptr() == state[s].data_ptr() for s in saved)}
    if missing - tied:
        raise RuntimeError(f"converted checkpoint lacks {sorted(missing - tied)[:3]}")


def pickle_only(source: str) -> bool:
    path = Path(source)
    return path.is_dir() and any(path.glob("*.bin")) and not any(path.glob("*.safetensors"))
