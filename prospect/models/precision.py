"""Which precision a run computes in (one decision, used by training, sampling and evaluation alike), and
weights that mean the same in bf16 as in fp32."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from prospect.errors import UserError
from prospect.models.attention import unwrapped
from prospect.models.scoring import split_head

log = logging.getLogger(__name__)


def bf16_supported(device: torch.device) -> bool:
    """Whether the device has fast bf16 matmuls (CPUs with AVX-512 BF16 or AMX, most recent GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def launched_precision() -> str:
    """accelerate's `mixed_precision` (a launch config's, passed on as ACCELERATE_MIXED_PRECISION): 'no',
    'bf16', 'fp16' or 'fp8'."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"


def resolve_precision(precision: str) -> str:
    """`train.precision` reconciled with accelerate's `mixed_precision`. prospect applies one precision to the
    policy, the reference, sampling and evaluation alike; accelerate's own autocast would wrap the prepared
    policy only, so policy and reference would differ from step 1 (the Accelerator is therefore made with
    mixed_precision 'no', see engine/launch.py). accelerate's bf16 is honoured with train.precision auto or
    bf16; any other combination is refused."""
    launched = launched_precision()
    if launched == "no" or launched == precision:
        return precision
    source = f"accelerate's mixed_precision={launched} (launch config or ACCELERATE_MIXED_PRECISION)"
    if launched == "bf16" and precision == "auto":
        log.info("precision: bf16, as %s asks", source)
        return "bf16"
    if launched == "bf16":
        raise UserError(
            f"{source} conflicts with train.precision={precision}; set mixed_precision to 'no' or "
            "train.precision to bf16"
        )
    raise UserError(
        f"{source}: prospect computes in bf16 or fp32 (train.precision); set mixed_precision to 'no' or 'bf16'"
    )


def use_bf16(precision: str, device: torch.device) -> bool:
    """`train.precision`: 'bf16' and 'fp32' as asked; 'auto' is bf16 where the device runs it fast (or where
    accelerate was launched with mixed_precision bf16, see `resolve_precision`)."""
    precision = resolve_precision(precision)
    if precision == "bf16" and not bf16_supported(device):
        log.warning("bf16 requested but %s has no fast bf16 matmuls; it will be slow", device)
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))


def cpu_only() -> bool:
    """No accelerator: every process runs on the CPU, and multi-process launches run over gloo (DDP, FSDP2
    sharded by prospect, or DeepSpeed ZeRO; see engine/launch.py)."""
    return not torch.accelerator.is_available()


def autocast_linears(model: nn.Module) -> list[nn.Linear]:
    """The linear layers whose fp32 weights bf16 autocast casts to bf16 at every forward: those of the trunk
    (prospect's output projection runs in fp32, see models/scoring.py), or every one when the model's logits
    are not a plain projection of its trunk. Weights tied to the input embeddings are left out: the lookup
    reads them in fp32."""
    trunk, _ = split_head(model)
    scope = trunk if trunk is not None else unwrapped(model)
    lookup = getattr(scope, "get_input_embeddings", None)
    embeddings = lookup() if callable(lookup) else None
    tied = {embeddings.weight.data_ptr()} if isinstance(embeddings, nn.Embedding) else set()
    return [
        m
        for m in scope.modules()
        if isinstance(m, nn.Linear) and m.weight.dtype == torch.float32 and m.weight.data_ptr() not in tied
    ]


def bf16_ties(weight: torch.Tensor) -> int:
    """fp32 values exactly halfway between two bf16 values. Round-to-nearest-even sends each to its even
    neighbour, so any update toward the odd one, however small, moves the bf16 value by a whole step."""
    low = weight.detach().contiguous().view(torch.int32) & 0xFFFF
    return int((low == 0x8000).sum())


def bf16_tie_fraction(model: nn.Module) -> float:
    linears = autocast_linears(model)
    total = sum(m.weight.numel() for m in linears)
    return sum(bf16_ties(m.weight) for m in linears) / max(total, 1)


@torch.no_grad()
def round_to_bf16(model: nn.Module) -> int:
    """Store each weight bf16 autocast casts as the bf16 value the cast gives, still in fp32: the bf16
    forward is unchanged, no weight sits on a rounding tie, and an fp32 run starts from the same values.
    Weights de-quantized from GGUF codes are often ties (9.6% of SmolLM2-135M's Q4_1 linear weights): the
    first optimizer step, however small, then flips them all by a bf16 step in the direction of the update,
    and the implied reward log pi/pi_ref jumps by nats. Returns the number of weights that changed."""
    changed = 0
    for module in autocast_linears(model):
        rounded = module.weight.to(torch.bfloat16).to(torch.float32)
        changed += int((rounded != module.weight).sum())
        module.weight.copy_(rounded)
    return changed


def warn_of_bf16_ties(model: nn.Module, limit: float = 0.01) -> None:
    """A model about to train in bf16 whose weights are often ties gets a warning (see `round_to_bf16`)."""
    ties = bf16_tie_fraction(model)
    if ties > limit:
        log.warning(
            "%.1f%% of the model's linear weights sit halfway between two bf16 values (as de-quantized weights "
            "do); the first update of a bf16 run moves each by a whole bf16 step. Store them as bf16 values "
            "first (prospect.models.precision.round_to_bf16) or train in fp32",
            100 * ties,
        )
