"""A lean decoding loop for CPU sampling: each prompt's prefix runs once for all its samples, and rows that
stopped leave the batch.

transformers' `generate` prefills every copy of a prompt that is sampled n times and keeps stopped rows in
the batch until the longest finishes. Here the distinct prompts are prefilled once, their KV cache is
repeated n times (`DynamicCache.batch_repeat_interleave`), and rows that reach a stop token are dropped from
the cache (`batch_select_indices`), so each step runs only the rows still writing. Temperature, top-k and
top-p are transformers' own logits warpers. Greedy decoding gives the tokens `generate` gives.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from prospect.models.attention import unwrapped


def warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' warpers in the order `generate` applies them."""
    out = LogitsProcessorList()
    if temperature > 0 and temperature != 1.0:
        out.append(TemperatureLogitsWarper(temperature))
    if top_k > 0:
        out.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        out.append(TopPLogitsWarper(top_p))
    return out


def cache_keyword(model: nn.Module) -> str:
    """transformers renamed the forward's `past_key_values` to `cache` (5.x); older releases know only the
    first."""
    forward = inspect.signature(unwrapped(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, prompts aligned on the right."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p)
        attention[i, width - len(p) :] = 1
    return input_ids, attention


@dataclass
class Mixture:
    """Nash-MD's opponent (Munos et al., 2023): the token-level geometric mixture of the model and a reference,
    p(token) proportional to pi(token)^(1 - weight) * pi_ref(token)^weight at every step, which decoding
    samples from. `context` wraps the reference's forwards (a LoRA policy with its adapter switched off)."""

    reference: nn.Module
    weight: float
    context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext


Part = tuple[nn.Module, Callable[[], contextlib.AbstractContextManager[Any]], float]


class Stepper:
    """The next-token logits of a model, or of a mixture of it with a reference (each with its own KV cache);
    rows are repeated or dropped in every cache together."""

    def __init__(self, model: nn.Module, mixture: Mixture | None):
        w = 0.0 if mixture is None else mixture.weight
        self.parts: list[Part] = [(model, contextlib.nullcontext, 1 - w)]
        if mixture is not None:
            self.parts.append((mixture.reference, mixture.context, w))
        self.caches = [DynamicCache() for _ in self.parts]

    def __call__(self, **inputs: Any) -> torch.Tensor:
        logits = [
            self.last_logits(model, context, cache, inputs)
            for (model, context, _), cache in zip(self.parts, self.caches)
        ]
        if len(logits) == 1:
            return logits[0]  # the model's own logits, as generate sees them
        return torch.stack([w * x.log_softmax(-1) for (_, _, w), x in zip(self.parts, logits)]).sum(0)

    @staticmethod
    def last_logits(
        model: nn.Module, context: Any, cache: DynamicCache, inputs: dict[str, Any]
    ) -> torch.Tensor:
        with context():
            output = model(**inputs, **{cache_keyword(model): cache, "use_cache": True})
        return output.logits[:, -1].float()

    def repeat(self, n: int) -> None:
        for cache in self.caches:
            cache.batch_repeat_interleave(n)

    def keep(self, rows: torch.Tensor) -> None:
        for cache in self.caches:
            cache.batch_select_indices(rows)


def sample_rows(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of [rows, vocab] probabilities, by inverse transform: the first index whose
    cumulative probability exceeds a uniform draw. Exact, like `torch.multinomial`, which draws an
    exponential variate for every entry of the vocabulary (a fifth of a CPU decoding step); this draws one
    uniform per row. Entries of probability 0 are never chosen."""
    cumulative = probs.float().cumsum(-1)
    total = cumulative[:, -1:]
    draw = torch.rand(total.shape, device=probs.device) * total
    # Kept below the total, which rounding could reach, so that the last non-zero entry ends the search.
    draw = torch.minimum(draw, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, draw, right=True).squeeze(1)


@torch.no_grad()
def decode(
    model: nn.Module,
    prompts: list[list[int]],
    n: int,
    max_new_tokens: int,
    stops: list[int],
    pad_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    on_step: Callable[[int], None] | None = None,
    mixture: Mixture | None = None,
) -> list[tuple[list[int], bool]]:
    """`n` completions of each prompt, prompt-major: (token ids ending with the stop token when one was
    reached, whether it was reached). Sampling uses the global RNG (greedy when `temperature` is 0).
    `on_step(rows)` is called after each decoding step with the number of rows that were decoded. With a
    `mixture`, tokens come from the geometric mixture of the model and its reference."""
    device = next(model.parameters()).device
    input_ids, attention = (t.to(device) for t in left_padded(prompts, pad_id))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    step_logits = Stepper(model, mixture)
    # The logits (the full vocabulary) at the last position only.
    logits = step_logits(
        input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=1
    )
    if n > 1:
        step_logits.repeat(n)
        logits, attention = logits.repeat_interleave(n, 0), attention.repeat_interleave(n, 0)
    next_position = attention.sum(-1, keepdim=True)
    process = warpers(temperature, top_k, top_p)
    stop_ids = torch.tensor(stops, dtype=torch.long, device=device)
    rows = torch.arange(logits.shape[0], device=device)  # which output each row of the batch writes
    tokens: list[list[int]] = [[] for _ in range(logits.shape[0])]
    finished = [False] * logits.shape[0]
    for step in range(max_new_tokens):
        if temperature > 0:
            scores = process(cast(torch.LongTensor, input_ids), logits)  # these warpers ignore the ids
            chosen = sample_rows(scores.softmax(-1))
        else:
            chosen = logits.argmax(-1)
        stopped = torch.isin(chosen, stop_ids)
        for row, token, stop in zip(rows.tolist(), chosen.tolist(), stopped.tolist(), strict=True):
            tokens[row].append(token)
            finished[row] = stop
        if on_step:
            on_step(len(rows))
        keep = (~stopped).nonzero().squeeze(1)
        if len(keep) == 0 or step == max_new_tokens - 1:
            break
        if len(keep) < len(rows):
            step_logits.keep(keep)
            rows, chosen, attention, next_position = (
                rows[keep],
                chosen[keep],
                attention[keep],
                next_position[keep],
            )
        attention = torch.cat([attention, attention.new_ones(len(rows), 1)], dim=1)
        logits = step_logits(input_ids=chosen[:, None], attention_mask=attention, position_ids=next_position)
        next_position = next_position + 1
    return list(zip(tokens, finished, strict=True))
