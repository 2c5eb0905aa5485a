"""final/README.md: a model card, so a run's final model is ready to share (`prospect push`).

Written from the run directory alone (config.yaml, metrics.jsonl, eval_before/after.json) with
huggingface_hub's `ModelCard`: base model, method, data, hyperparameters and the held-out results.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from prospect import __version__
from prospect.config import Config
from prospect.losses import get_loss
from prospect.models.default import EMBEDDED
from prospect.models.loading import given_name, looks_local
from prospect.recipe import load_config

HYPERPARAMETERS = {
    "train": (
        "learning_rate",
        "lr_scheduler",
        "warmup_ratio",
        "weight_decay",
        "batch_size",
        "grad_accum",
        "max_steps",
        "epochs",
        "max_grad_norm",
        "precision",
        "reference",
        "seed",
    ),
    "data": ("max_length", "max_prompt_length"),
}
LORA = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")


def hub_base_model(config: Config) -> str | None:
    """The base model's hub name, for the card's metadata (a local path is named in the text only)."""
    name = config.model.name
    if name in EMBEDDED:
        return EMBEDDED[name].upstream
    if (
        Path(name).expanduser().exists()
        or looks_local(name)
        or name.count("/") != 1
        or config.model.gguf_file
    ):
        return None
    return name


def flat_numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """{"judge/pearson_r": 0.43, ...}: the numbers of a result, nested keys joined with '/'."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def steps_trained(run_dir: Path) -> int | None:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value) if isinstance(value, (bool, int)) else f"`{value}`"


def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """A markdown table; the first column holds names."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join([f"`{row[0]}`", *map(cell, row[1:])]) + " |" for row in rows]
    return "\n".join(lines)


def results_section(run_dir: Path, config: Config) -> str:
    before = flat_numbers(read_json(run_dir / "eval_before.json"))
    after = flat_numbers(read_json(run_dir / "eval_after.json"))
    if not after:
        return "No held-out evaluation was run (eval.num_prompts was 0)."
    rows = [(key, before.get(key), value) for key, value in after.items()]
    body = table(("metric", "before training", "after training"), rows)
    e = config.eval
    return (
        f"eval.num_prompts={e.num_prompts}, judge `{e.judge}` (eval_before.json, eval_after.json):\n\n{body}"
    )


def card_text(run_dir: Path, config: Config, loss_params: Any = None, steps: int | None = None) -> str:
    """The card's markdown; `loss_params` and `steps` as the trainer resolved them (the loss options after
    data-dependent settings such as KTO's weights from the counts), else read back from the run directory."""
    spec = get_loss(config.loss_name)
    if loss_params is None:
        loss_params = spec.make_params(config.loss, f"{run_dir}/config.yaml: loss")
    loss = dataclasses.asdict(loss_params)
    m, d = config.model, config.data
    base = given_name(m)
    embedded = EMBEDDED.get(m.name)
    origin = (
        f" (prospect's embedded `{m.name}`: its GGUF `{embedded.filename}`, de-quantized)" if embedded else ""
    )
    lora = m.lora_r > 0
    params = [
        (f"{s}.{k}", getattr(getattr(config, s), k)) for s, keys in HYPERPARAMETERS.items() for k in keys
    ]
    params += [(f"model.{k}", getattr(m, k)) for k in LORA] if lora else []
    params += [("steps trained", steps if steps is not None else steps_trained(run_dir))]
    data = f"`{d.train}` (split `{d.train_split}`, format `{d.format}`{f', at most {d.limit} rows' if d.limit else ''})"
    template = f"; chat template `{m.chat_template}`" if m.chat_template else ""
    lines = [
        f"# {run_dir.name}",
        "",
        f"Fine-tuned from `{base}`{origin} with prospect {__version__}.",
        "",
        "## Method",
        "",
        f"`{spec.name}`: {spec.describe().rstrip('.')}. "
        + (
            "LoRA adapters merged into the weights; the adapter alone is in `adapter/`."
            if lora
            else "Full fine-tuning."
        )
        + template,
        "",
        table(("loss option", "value"), [(k, v) for k, v in loss.items()]),
        "",
        "## Data",
        "",
        f"Training: {data}.",
        "",
        "## Hyperparameters",
        "",
        table(("option", "value"), params),
        "",
        "## Held-out results",
        "",
        results_section(run_dir, config),
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: Path, loss_params: Any = None, steps: int | None = None) -> Path:
    """Write final/README.md for the run in `run_dir` (see `card_text`); returns its path."""
    config = load_config(str(run_dir / "config.yaml"))
    spec = get_loss(config.loss_name)
    embedded = EMBEDDED.get(config.model.name)
    tag = "text-generation" if spec.model == "policy" else "text-classification"
    data = ModelCardData(
        base_model=hub_base_model(config),
        library_name="diffusers" if spec.loop == "diffusion" else "transformers",
        license=embedded.license if embedded else None,
        pipeline_tag=None if spec.loop == "diffusion" else tag,
        tags=["prospect", spec.name, *(["lora"] if config.model.lora_r > 0 else [])],
    )
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{card_text(run_dir, config, loss_params, steps)}")
    path = run_dir / "final" / "README.md"
    card.save(path)
    return path
