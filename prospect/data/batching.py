"""Padded tensors for the engine, and the stateless batch order that makes runs resumable."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from prospect.data.tokenize import Encoded


@dataclass
class Sequences:
    """Right-padded prompt + completion token ids. `completion_mask[i, t]` marks completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


def pad(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Sequences:
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = True
    return Sequences(input_ids, attention, completion)


@dataclass
class Batch:
    """One microbatch. `units` counts what the loss averages over (examples or pairs)."""

    sequences: Sequences
    locations: list[str]
    units: int
    labels: torch.Tensor | None = None
    kl_sequences: Sequences | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.sequences.to(device),
            self.locations,
            self.units,
            None if self.labels is None else self.labels.to(device),
            None if self.kl_sequences is None else self.kl_sequences.to(device),
        )


def unpaired_batch(items: list[Encoded], pad_id: int, kl_fit: Callable[[Encoded], Encoded] | None) -> Batch:
    """Labelled completions; with `kl_fit`, also KTO's mismatched pairs (x_i, y_{(i+1) mod n})."""
    sequences = pad([it.prompt_ids for it in items], [it.completion_ids for it in items], pad_id)
    labels = torch.tensor([bool(it.label) for it in items], dtype=torch.bool)
    kl = None
    if kl_fit is not None:
        n = len(items)
        shifted = [
            kl_fit(Encoded(items[i].prompt_ids, items[(i + 1) % n].completion_ids, None, ""))
            for i in range(n)
        ]
        kl = pad([s.prompt_ids for s in shifted], [s.completion_ids for s in shifted], pad_id)
    return Batch(sequences, [it.location for it in items], len(items), labels, kl)


def step_indices(num_items: int, global_batch: int, seed: int, step: int) -> list[int]:
    """Example indices for optimizer step `step`: a fresh seeded permutation each epoch, the tail that
    does not fill a global batch left out. Depends only on its arguments, so a resumed run continues
    exactly where it stopped."""
    per_epoch = num_items // global_batch
    epoch, offset = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator)
    return order[offset * global_batch : (offset + 1) * global_batch].tolist()


def microbatch_slice(indices: list[int], micro: int, rank: int, world: int, batch_size: int) -> list[int]:
    """Microbatch `micro` of this rank: blocks are laid out micro-major, so one process accumulating
    k microbatches sees the same blocks as k processes taking one each."""
    start = (micro * world + rank) * batch_size
    return indices[start : start + batch_size]
