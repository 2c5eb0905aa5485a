"""The shapes of training data a loss can ask for, each in one entry: how rows of any format convert to it,
which (prompt, completion) sequences a list of its items runs as, in row order, and the tensors a batch of
them carries beside the sequences. The engine, the reference cache plan and the tests all build batches
through `make_batch`, so the three can never disagree."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from prospect.config import DataConfig
from prospect.data.batching import Batch, Sequences, pad
from prospect.data.convert import (
    to_completions,
    to_duels,
    to_groups,
    to_pairs,
    to_prompts,
    to_rated,
    to_unpaired,
)

DataShape = Literal["unpaired", "paired", "completions", "ranked", "rated", "prompts", "duels"]
Converter = Callable[[str, list, DataConfig, int], list]
Builder = Callable[[list[list[int]], list[list[int]], int], Sequences]  # pad, or packing.pack
TokenLists = tuple[list[list[int]], list[list[int]]]


def one_each(items: list) -> TokenLists:
    return [it.prompt_ids for it in items], [it.completion_ids for it in items]


def chosen_then_rejected(pairs: list) -> TokenLists:
    """Rows 0..B-1 are the chosen completions, B..2B-1 the rejected ones (losses' `chosen_rejected`)."""
    return [p.prompt_ids for p in pairs] * 2, [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]


def every_completion(groups: list) -> TokenLists:
    """Each list's completions, best first, list after list."""
    return [g.prompt_ids for g in groups for _ in g.completions], [c for g in groups for c in g.completions]


def agreement(items: list) -> dict[str, torch.Tensor]:
    """Each unit's raters' agreement with its label (NaN where unknown); nothing when no item has one."""
    values = [getattr(it, "agreement", None) for it in items]
    if all(v is None for v in values):
        return {}
    return {"agreement": torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)}


def labels(items: list) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([bool(it.label) for it in items], dtype=torch.bool), **agreement(items)}


def ratings(items: list) -> dict[str, torch.Tensor]:
    return {"targets": torch.tensor([it.rating for it in items], dtype=torch.float32)}


def ranks(groups: list) -> dict[str, torch.Tensor]:
    scores = [s for g in groups for s in (g.scores or [math.nan] * len(g.completions))]
    return {
        "group_index": torch.tensor([i for i, g in enumerate(groups) for _ in g.completions]),
        "targets": torch.tensor(scores, dtype=torch.float32),
    }


def nothing(items: list) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Shape:
    convert: Converter
    sequences: Callable[[list], TokenLists] | None  # None: items are prompts to sample from, not to train on
    fields: Callable[[list], dict[str, Any]]


SHAPES: dict[str, Shape] = {
    "unpaired": Shape(to_unpaired, one_each, labels),
    "completions": Shape(to_completions, one_each, labels),
    "paired": Shape(to_pairs, chosen_then_rejected, agreement),
    "ranked": Shape(to_groups, every_completion, ranks),
    "rated": Shape(to_rated, one_each, ratings),
    "prompts": Shape(to_prompts, None, nothing),
    "duels": Shape(to_duels, one_each, labels),  # the prompt, then both completions; label: the first wins
}


def sequences_of(items: list, shape: DataShape) -> TokenLists:
    rows = SHAPES[shape].sequences
    if rows is None:
        raise ValueError(f"{shape} items are sampled from, not trained on as sequences")
    return rows(items)


def make_batch(items: list, shape: DataShape, pad_id: int, build: Builder = pad) -> Batch:
    """A microbatch of `items`, one unit per item, its sequences laid out by `build`."""
    prompts, completions = sequences_of(items, shape)
    sequences = build(prompts, completions, pad_id)
    return Batch(sequences, [it.location for it in items], len(items), **SHAPES[shape].fields(items))
