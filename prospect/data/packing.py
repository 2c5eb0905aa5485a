"""Packing: sequences end to end in rows with per-sequence positions, so no compute goes to padding, and
sequences with one prompt sharing its forward where the attention supports it."""

from __future__ import annotations

import torch

from prospect.data.batching import Sequences, sequence_key
from prospect.data.layout import SegmentLayout, Span


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
