"""Segment attention: sequences packed in a row attend only within themselves, and sequences that share a
prompt share its forward.

A row holds spans laid end to end. A span attends causally to itself and, if it is a branch, to a prefix
of an earlier span of the same row (the shared prompt). Padded rows have one span per sequence and one
for the pad tail; packed rows one per sequence. transformers derives packed masks from position ids, which
cannot express a branch; the layout can.

The layout reaches the attention function as the `segment_layout` keyword of the model's forward, which
transformers passes down to every attention layer (and gradient checkpointing replays). Without a layout
(generation, or a caller that sets none) the function is eager attention with transformers' mask.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, cast

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

from prospect.data.layout import SegmentLayout

NAME = "prospect_segments"
SEGMENT_KERNEL = (
    "eager"  # or "sdpa" (benchmarks/ab_step.py): the kernel segment attention runs under a layout
)


_LAYOUT_ACTIVE = contextvars.ContextVar("prospect_segment_layout", default=False)


@contextlib.contextmanager
def layout_active() -> Iterator[None]:
    """While set, models with segment attention build no attention mask (the layout replaces it)."""
    token = _LAYOUT_ACTIVE.set(True)
    try:
        yield
    finally:
        _LAYOUT_ACTIVE.reset(token)


def segment_mask(*args, **kwargs) -> torch.Tensor | None:
    return None if _LAYOUT_ACTIVE.get() else eager_mask(*args, **kwargs)


def segment_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    segment_layout: SegmentLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention under the layout's mask: one scaled-dot-product call per layer with the layout as a boolean
    mask (SEGMENT_KERNEL "sdpa"), or eager attention under the same mask ("eager"). Without a layout it is
    eager attention with transformers' mask. Per-span SDPA calls were measured slower on this CPU than one
    masked call per layer (8.4 s against 5.6 s for a DPO 128 step)."""
    if segment_layout is None:
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if SEGMENT_KERNEL == "sdpa":
        mask = segment_layout.allowed_mask(query.shape[2], query.device)
        return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, is_causal=False)
    mask = segment_layout.additive_mask(query.shape[2], query.device)
    return eager_attention_forward(module, query, key, value, mask, scaling, dropout, **kwargs)


AttentionInterface.register(NAME, segment_attention)
AttentionMaskInterface.register(NAME, segment_mask)


def unwrapped(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a PEFT wrapper (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if get_base_model is not None else model
    # cast: the models prospect scores are transformers models (load_model, load_reward_model), bare or in PEFT.
    return cast(PreTrainedModel, base)


def uses_segments(model: torch.nn.Module) -> bool:
    return getattr(getattr(unwrapped(model), "config", None), "_attn_implementation", None) == NAME


def attention_kernel(model: torch.nn.Module) -> str:
    """The model's attention as it affects rounding: its implementation, and segment attention's kernel when
    it is not the default (so reference caches written before the switch existed stay valid)."""
    name = str(getattr(getattr(unwrapped(model), "config", None), "_attn_implementation", ""))
    return f"{name}-{SEGMENT_KERNEL}" if name == NAME and SEGMENT_KERNEL != "eager" else name


EAGER_ATTENTION_FACTOR = 3.0  # eager attention's cost per FLOP against the linear layers' (fp32 softmax)


def attention_cost(model: torch.nn.Module) -> float:
    """What one attended (query, key) pair costs relative to one token through the linear layers: 4 * hidden
    FLOPs per layer for QK^T and AV at EAGER_ATTENTION_FACTOR times the matmuls' cost per FLOP, against
    2 * (parameters per layer). About 1e-3 for SmolLM2-135M, so a 512-token row costs 1.5x its tokens."""
    base = unwrapped(model)
    config = base.config
    embeddings = base.get_input_embeddings().weight
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"{type(base).__name__}: expected input embeddings with a weight tensor")
    per_layer = (sum(p.numel() for p in base.parameters()) - embeddings.numel()) / config.num_hidden_layers
    return EAGER_ATTENTION_FACTOR * 4 * config.hidden_size / (2 * per_layer)


def model_inputs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    layout: SegmentLayout | None,
) -> tuple[dict[str, Any], contextlib.AbstractContextManager]:
    """Keyword arguments for a transformers forward, and the context to run it in. Packed rows pass
    position ids and no mask; a layout is used when the model runs segment attention."""
    inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        inputs.update(position_ids=position_ids, attention_mask=None)
    if layout is not None and uses_segments(model):
        inputs["segment_layout"] = layout
        return inputs, layout_active()
    if layout is not None and layout.shares_prompts:
        raise ValueError(f"shared prompts need model.attn_implementation={NAME}")
    return inputs, contextlib.nullcontext()
