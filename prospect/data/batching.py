"""Tensors for the engine, padded or packed, and the stateless batch order that makes runs resumable."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prospect.data.tokenize import Encoded, EncodedGroup, EncodedPair
from prospect.models.attention import SegmentLayout, Span


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
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Sequences(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.completion_mask),
            move(self.sequence_index),
            self.num_sequences,
            move(self.position_ids),
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


def pack(
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    width: int | None = None,
    share_prompts: bool = False,
    attention_cost: float = 0.0,
) -> Sequences:
    """Sequences end to end in rows at least `width` tokens wide (default: the longest sequence, so never
    wider than the padded batch), filled first-fit in decreasing length. Only the rows' tails are padding;
    each pad tail is a dummy segment with its own positions, so it never attends into a real sequence.

    With `share_prompts` (segment attention only), sequences with the same prompt form groups: the first is
    laid out whole, each other one as a branch holding a copy of the prompt's last token (whose next-token
    log-prob is its first completion token's) and its completion, attending to the rest of the prompt
    through the layout. The prompt is computed once per group instead of once per sequence. Groups widen
    rows, and attention costs the square of a row, so of three plans (no sharing; groups cut to the
    longest sequence; whole groups) the cheapest is kept, a row of width W costing
    W * (1 + attention_cost * W) token slots."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    longest = max(lengths, default=1)
    candidates = []  # most sharing first: it wins ties
    if share_prompts:
        shared = prompt_groups(prompts)
        for cap in (None, longest):
            candidates.append([part for g in shared for part in fit_group(g, lengths, prompts, cap)])
    candidates.append([[i] for i in range(len(prompts))])

    def plan(groups: list[list[int]]) -> tuple[list[list[int]], list[list[int]], int]:
        sizes = [lengths[g[0]] + sum(lengths[i] - len(prompts[i]) + 1 for i in g[1:]) for g in groups]
        return (groups, *first_fit(sizes, max(max(sizes, default=1), width or 0)))

    def cost(p: tuple) -> float:
        rows, used = len(p[1]), p[2]
        return rows * used * (1 + attention_cost * used)

    groups, rows, used = min((plan(c) for c in candidates), key=cost)
    shape = (len(rows), used)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    completion = torch.zeros(shape, dtype=torch.bool)
    index = torch.full(shape, -1, dtype=torch.long)
    layout = []
    for r, members in enumerate(rows):
        at, spans = 0, []
        for g in sorted(members):
            group_start, prompt = at, prompts[groups[g][0]]
            for k, i in enumerate(groups[g]):
                # the first member: prompt + completion; a branch: the prompt's last token + completion
                head = prompt if k == 0 else prompt[-1:]
                tokens = head + completions[i]
                n, first = len(tokens), len(prompt) - len(head)
                input_ids[r, at : at + n] = torch.tensor(tokens, dtype=torch.long)
                positions[r, at : at + n] = torch.arange(first, first + n)
                completion[r, at + len(head) : at + n] = True
                index[r, at : at + n] = i
                spans.append(Span(at, n, group_start, first))
                at += n
        if at < used:
            positions[r, at:] = torch.arange(used - at)
            spans.append(Span(at, used - at))
        layout.append(tuple(spans))
    keys = [sequence_key(p, c) for p, c in zip(prompts, completions)]
    return Sequences(
        input_ids,
        None,
        completion,
        index,
        len(prompts),
        position_ids=positions,
        keys=keys,
        layout=SegmentLayout(tuple(layout)),
        num_tokens=sum(lengths),
    )


def first_fit(sizes: list[int], width: int) -> tuple[list[list[int]], int]:
    """(items per row, the widest row's filled width): first-fit in decreasing size."""
    rows: list[list[int]] = []
    room: list[int] = []
    for g in sorted(range(len(sizes)), key=lambda g: -sizes[g]):
        row = next((r for r, free in enumerate(room) if free >= sizes[g]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(g)
        room[row] -= sizes[g]
    return rows, max((width - free for free in room), default=1)


def fit_group(
    group: list[int], lengths: list[int], prompts: list[list[int]], width: int | None
) -> list[list[int]]:
    """Split a prompt group into parts at most `width` wide (None: keep it whole)."""
    parts: list[list[int]] = []
    size = 0
    for i in group:
        branch = lengths[i] - len(prompts[i]) + 1
        if parts and (width is None or size + branch <= width):
            parts[-1].append(i)
            size += branch
        else:
            parts.append([i])
            size = lengths[i]
    return parts


def prompt_groups(prompts: list[list[int]]) -> list[list[int]]:
    """Indices of sequences with identical (non-empty) prompts, in order of first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    singles = []
    for i, prompt in enumerate(prompts):
        if prompt:
            groups.setdefault(tuple(prompt), []).append(i)
        else:
            singles.append([i])
    return sorted([*groups.values(), *singles])


@dataclass
class Batch:
    """One microbatch. `units` counts what example-normalised losses average over (examples or pairs)."""

    sequences: Sequences
    locations: list[str]
    units: int
    labels: torch.Tensor | None = None
    kl_sequences: Sequences | None = None
    group_index: torch.Tensor | None = (
        None  # ranked lists: which list each sequence belongs to (rows best first)
    )
    targets: torch.Tensor | None = None  # ratings: regression targets, or scores of ranked completions

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(
            self.sequences.to(device),
            self.locations,
            self.units,
            move(self.labels),
            move(self.kl_sequences),
            move(self.group_index),
            move(self.targets),
        )


Builder = Callable[[list[list[int]], list[list[int]], int], Sequences]


def unpaired_batch(
    items: list[Encoded], pad_id: int, kl_fit: Callable[[Encoded], Encoded] | None, build: Builder = pad
) -> Batch:
    """Labelled completions; with `kl_fit`, also KTO's mismatched pairs (x_i, y_{(i+1) mod n})."""
    sequences = build([it.prompt_ids for it in items], [it.completion_ids for it in items], pad_id)
    labels = torch.tensor([bool(it.label) for it in items], dtype=torch.bool)
    kl = None
    if kl_fit is not None:
        shifted = mismatched(items, kl_fit)
        kl = build([s.prompt_ids for s in shifted], [s.completion_ids for s in shifted], pad_id)
    return Batch(sequences, [it.location for it in items], len(items), labels, kl)


def mismatched(items: list[Encoded], fit: Callable[[Encoded], Encoded]) -> list[Encoded]:
    n = len(items)
    return [fit(Encoded(items[i].prompt_ids, items[(i + 1) % n].completion_ids, None, "")) for i in range(n)]


def group_batch(groups: list[EncodedGroup], pad_id: int, build: Builder = pad) -> Batch:
    """Ranked lists for reward models: every completion once, grouped, best first within a group."""
    prompts = [g.prompt_ids for g in groups for _ in g.completions]
    completions = [c for g in groups for c in g.completions]
    index = torch.tensor([i for i, g in enumerate(groups) for _ in g.completions])
    scores = [s for g in groups for s in (g.scores or [math.nan] * len(g.completions))]
    return Batch(
        build(prompts, completions, pad_id),
        [g.location for g in groups],
        len(groups),
        group_index=index,
        targets=torch.tensor(scores, dtype=torch.float32),
    )


def rated_batch(items: list[Encoded], pad_id: int, build: Builder = pad) -> Batch:
    sequences = build([it.prompt_ids for it in items], [it.completion_ids for it in items], pad_id)
    targets = torch.tensor([it.rating for it in items], dtype=torch.float32)
    return Batch(sequences, [it.location for it in items], len(items), targets=targets)


def paired_batch(pairs: list[EncodedPair], pad_id: int, build: Builder = pad) -> Batch:
    """Chosen and rejected in one forward: rows 0..B-1 are chosen, B..2B-1 rejected."""
    prompts = [p.prompt_ids for p in pairs] * 2
    completions = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    return Batch(build(prompts, completions, pad_id), [p.location for p in pairs], len(pairs))


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
