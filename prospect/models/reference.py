"""The reference policy pi_ref of the implied reward beta * log(pi / pi_ref).

Three ways to get log pi_ref(y|x) for a batch of sequences:
- a frozen copy of the initial policy (optionally refreshed from the policy every N steps, TR-DPO);
- the LoRA policy with its adapter disabled, so no second copy of the weights is held;
- a cache filled once in a no-grad pass and stored in safetensors, keyed by each sequence's content
  (never by position), under a fingerprint of the reference weights, tokenizer, truncation, precision and
  attention. In bf16 a packed row rounds a sequence by where it sits, so there the key is the content of
  the whole microbatch the sequence is trained in (`by_layout`), and the cache is filled with those very
  microbatches.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prospect.assets import cache_dir
from prospect.data.batching import Sequences, pad
from prospect.errors import UserError
from prospect.io import atomic_path
from prospect.models.decoding import Mixture
from prospect.models.scoring import TokenScorer, split_head

if TYPE_CHECKING:
    from peft import PeftModel

ReferenceFn = Callable[[Sequences], torch.Tensor]


def resolve_reference_mode(requested: str, lora: bool) -> str:
    if requested == "auto":
        return "adapter" if lora else "copy"
    if requested == "adapter" and not lora:
        raise UserError("train.reference=adapter needs a LoRA policy (model.lora_r > 0)")
    return requested


def store_linears_in_bf16(model: nn.Module) -> bool:
    """Under bf16 autocast every linear layer of the trunk casts its fp32 weight to bf16 at each forward.
    A frozen reference can hold them in bf16 once: the same numbers, half their memory, no casts. Kept only
    if a probe forward is bit-identical to the fp32-stored model's (a model whose code upcasts a weight
    itself would fail it and stays fp32). Returns whether the weights were converted."""
    trunk, _ = split_head(model)
    if trunk is None:
        return False
    linears = [m for m in trunk.modules() if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32]
    if not linears:
        return False
    device = next(model.parameters()).device
    probe = torch.arange(16, device=device).unsqueeze(0) % getattr(model.config, "vocab_size", 16)

    def run() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            return trunk(input_ids=probe, use_cache=False).last_hidden_state

    want = run()
    for module in linears:
        module.to(torch.bfloat16)
    if torch.equal(run(), want):
        return True
    for module in linears:
        module.to(torch.float32)
    return False


def frozen(module: nn.Module) -> nn.Module:
    """`module` never trained: no gradients, evaluation mode."""
    module.requires_grad_(False)
    return module.eval()


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with gradients off, taken before training touches the policy."""
    return frozen(copy.deepcopy(model))


class FrozenReference:
    """log pi_ref from a frozen model through the same TokenScorer code path as the policy."""

    def __init__(self, model: nn.Module, bf16: bool, chunk: int):
        self.scorer = TokenScorer(model, bf16=bf16, chunk=chunk)

    @torch.no_grad()
    def token_logps(self, seqs: Sequences) -> torch.Tensor:
        return self.scorer.token_logps(seqs)

    def mixture(self, weight: float) -> Mixture:
        """The geometric mixture of the policy with this reference, to decode from (Nash-MD)."""
        return Mixture(self.scorer.model, weight)

    def __call__(self, seqs: Sequences) -> torch.Tensor:
        return seqs.per_sequence(self.token_logps(seqs))


class AdapterReference(FrozenReference):
    """The policy itself with its LoRA adapter switched off; `policy_token_logps` runs the (wrapped) policy."""

    def __init__(self, policy_token_logps: Callable[[Sequences], torch.Tensor], peft_model: PeftModel):
        self.policy_token_logps = policy_token_logps
        self.peft_model = peft_model

    @torch.no_grad()
    def token_logps(self, seqs: Sequences) -> torch.Tensor:
        with self.peft_model.disable_adapter():
            return self.policy_token_logps(seqs)

    def mixture(self, weight: float) -> Mixture:
        return Mixture(self.peft_model, weight, context=self.peft_model.disable_adapter)


@torch.no_grad()
def refresh_copy(reference_model: nn.Module, policy_model: nn.Module, alpha: float) -> None:
    """TR-DPO: pi_ref <- alpha * pi + (1 - alpha) * pi_ref (alpha = 1 copies the policy)."""
    policy = dict(policy_model.named_parameters())
    for name, param in reference_model.named_parameters():
        param.lerp_(policy[name].detach().to(param.dtype), alpha)


def weights_fingerprint(model: nn.Module, skip: str = "lora_") -> str:
    """Hash of the architecture and every weight (LoRA weights excluded: the adapter-disabled reference
    does not depend on them)."""
    digest = hashlib.blake2b(digest_size=16)
    config = getattr(model, "config", None)
    digest.update(
        json.dumps(config.to_dict() if config is not None else {}, sort_keys=True, default=str).encode()
    )
    for name, tensor in sorted(model.state_dict().items()):
        if skip in name:
            continue
        digest.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
        digest.update(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    text += str(getattr(tokenizer, "chat_template", "")) + str(tokenizer.all_special_tokens)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def layout_keys(keys: list[bytes]) -> list[bytes]:
    """Each sequence's place in the batch joined with the keys of the whole batch, in order: a packed
    batch's layout is a function of them (and of the packing settings, which the fingerprint holds). Two
    copies of a sequence in one batch sit in different places, so they get different keys."""
    batch = hashlib.blake2b(b"".join(keys), digest_size=16).digest()
    return [
        hashlib.blake2b(batch + i.to_bytes(4, "little"), digest_size=16).digest() for i in range(len(keys))
    ]


class ReferenceCache:
    """Reference log-probs by sequence key, in one safetensors file per fingerprint. With `by_layout`, by
    the key of the sequence within its batch (see `layout_keys`)."""

    def __init__(self, fingerprint: str, directory: Path | None = None, by_layout: bool = False):
        self.path = (directory or cache_dir() / "reference") / f"{fingerprint}.safetensors"
        self.by_layout = by_layout
        self.table: dict[bytes, float] = {}
        if self.path.is_file():
            tensors = load_file(str(self.path))
            keys = tensors["keys"].numpy()
            self.table = {bytes(k): float(v) for k, v in zip(keys, tensors["logps"].tolist())}
        self.computed = 0  # entries computed by this process, i.e. reference sequences actually run

    def missing(
        self, items: Iterable[tuple[bytes, list[int], list[int]]]
    ) -> list[tuple[bytes, list[int], list[int]]]:
        seen: set[bytes] = set()
        out = []
        for key, prompt, completion in items:
            if key not in self.table and key not in seen:
                seen.add(key)
                out.append((key, prompt, completion))
        return out

    def fill(
        self,
        items: list[tuple[bytes, list[int], list[int]]],
        reference: ReferenceFn,
        pad_id: int,
        device: torch.device,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Run the reference on `items`, longest first so batches hold similar lengths."""
        order = sorted(items, key=lambda it: len(it[1]) + len(it[2]), reverse=True)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            seqs = pad([c[1] for c in chunk], [c[2] for c in chunk], pad_id).to(device)
            for (key, _, _), value in zip(chunk, reference(seqs).tolist()):
                self.table[key] = value
            self.computed += len(chunk)
            if progress:
                progress(len(chunk))

    def keys(self, seqs: Sequences) -> list[bytes]:
        if seqs.keys is None:
            raise ValueError("the reference cache needs the sequences' keys; these were built without them")
        return layout_keys(seqs.keys) if self.by_layout else seqs.keys

    def fill_batches(
        self,
        batches: Iterable[Sequences],
        reference: ReferenceFn,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Run the reference on each batch as it is laid out, unless every value is known already."""
        for seqs in batches:
            keys = self.keys(seqs)
            if any(k not in self.table for k in keys):
                self.table.update(zip(keys, reference(seqs).tolist()))
                self.computed += len(keys)
            if progress:
                progress(1)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.table)
        tensors = {
            "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), 16),
            "logps": torch.tensor([self.table[k] for k in keys], dtype=torch.float32),
        }
        with atomic_path(self.path) as tmp:
            save_file(tensors, str(tmp))

    def lookup(self, seqs: Sequences) -> torch.Tensor:
        try:
            values = [self.table[k] for k in self.keys(seqs)]
        except KeyError:
            raise RuntimeError("reference cache miss: a sequence was not precomputed") from None
        return torch.tensor(values, dtype=torch.float32, device=seqs.input_ids.device)
