"""Tensors for the engine (padded here, packed in packing.py), and the stateless batch order that makes runs\nresumable."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from prospect.data.layout import SegmentLayout


@dataclass
class Sequences:
    """Prompt + completion token ids, one sequence per row (padded) or several per row (packed).

    `completion_mask[r, t]` marks completion tokens; `sequence_index[r, t]` says which sequence a token
    belongs to (-1 for padding). Packed rows carry `position_ids` that restart at 0 for each sequence and
    no attention mask, so transformers keeps attention within each sequence and no compute goes to padding.
    `layout` lists each row's spans for prospect's segment attention; packed sequences that share a prompt
    may share its tokens (then `num_tokens` still counts each sequence's prompt).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    completion_mask: torch.Tensor
    sequence_index: torch.Tensor
    num_sequences: int
    position_ids: torch.Tensor | None = None
    keys: list[bytes] | None = None  # content hash of each sequence, for the reference cache
    layout: SegmentLayout | None = None
    num_tokens: int | None = None  # prompt + completion tokens of all sequences, when prompts are shared

    def to(self, device: torch.device | str) -> Sequences:
        return Sequences(
            self.input_ids.to(device),
            moved(self.attention_mask, device),
            self.completion_mask.to(device),
            self.sequence_index.to(device),
            self.num_sequences,
            moved(self.position_ids, device),
            self.keys,
            self.layout,
            self.num_tokens,
        )

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def tokens(self) -> int:
        """Prompt and completion tokens of the sequences (a shared prompt counts once per sequence)."""
        return self.num_tokens if self.num_tokens is not None else int((self.sequence_index >= 0).sum())

    def model_inputs(self) -> tuple:
        """(input_ids, attention_mask, position_ids, layout), as scorers take them."""
        return self.input_ids, self.attention_mask, self.position_ids, self.layout

    def per_sequence(self, token_values: torch.Tensor) -> torch.Tensor:
        """Sum [rows, T-1] next-token values (zero off completions) into one value per sequence, [N]."""
        index = self.sequence_index[:, 1:].clamp(min=0).flatten()
        out = token_values.new_zeros(self.num_sequences)
        return out.index_add(0, index, token_values.flatten())

    def completion_lengths(self) -> torch.Tensor:
        ones = self.completion_mask[:, 1:].float()
        return self.per_sequence(ones)


def moved(tensor: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def sequence_key(prompt: list[int], completion: list[int]) -> bytes:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(len(prompt).to_bytes(4, "little"))
    digest.update(torch.tensor(prompt + completion, dtype=torch.int64).numpy().tobytes())
    return digest.digest()


def pad(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Sequences:
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    completion = torch.zeros((n, width), dtype=torch.bool)
    index = torch.full((n, width), -1, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention[i, : len(p) + len(c)] = 1
        completion[i, len(p) : len(p) + len(c)] = True
        index[i, : len(p) + len(c)] = i
    keys = [sequence_key(p, c) for p, c in zip(prompts, completions)]
    layout = SegmentLayout.padded([len(p) + len(c) for p, c in zip(prompts, completions)], width)
    return Sequences(input_ids, attention, completion, index, n, keys=keys, layout=layout)


@dataclass
class Batch:
    """One microbatch. `units` counts what example-normalised losses average over (examples, pairs or lists).
    `point_sequences` are the extra sequences a loss's reference point is estimated on (KTO: mismatched
    pairs), run with no gradient."""

    sequences: Sequences
    locations: list[str]
    units: int
    labels: torch.Tensor | None = None  # desirable (True) or not, per sequence
    point_sequences: Sequences | None = None
    group_index: torch.Tensor | None = None  # ranked lists: the list of each sequence (rows best first)
    targets: torch.Tensor | None = None  # ratings: regression targets, or scores of ranked completions
    agreement: torch.Tensor | None = None  # per unit: the raters' agreement with its label (NaN: unknown)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.sequences.to(device),
            self.locations,
            self.units,
            moved(self.labels, device),
            None if self.point_sequences is None else self.point_sequences.to(device),
            moved(self.group_index, device),
            moved(self.targets, device),
            moved(self.agreement, device),
        )


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
