"""From a data source to encoded training items in the shape a loss declares it needs."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prospect.config import DataConfig
from prospect.data.formats import Example, Pair, pairs_to_unpaired, parse_rows
from prospect.data.sources import read_rows
from prospect.data.tokenize import Encoded, Encoder
from prospect.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    items: list[Encoded]
    counts: dict[str, int]  # e.g. {"desirable": n_D, "undesirable": n_U}
    truncated: int


def read_examples(cfg: DataConfig, needs: str, seed: int) -> list[Example]:
    """Read and check every training row (no tokenizer needed, so bad data fails fast)."""
    rows = read_rows(cfg.train, cfg.train_split)
    if cfg.limit > 0:
        rows = rows[: cfg.limit]
    kind, parsed = parse_rows(rows, cfg.format)
    if needs != "unpaired":
        raise UserError(f"no loss consumes '{needs}' data yet")
    return pairs_to_unpaired(parsed, seed) if kind == "paired" else parsed  # type: ignore[return-value]


def label_counts(examples: list[Example]) -> dict[str, int]:
    desirable = sum(bool(e.label) for e in examples)
    return {"desirable": desirable, "undesirable": len(examples) - desirable}


def encode_examples(examples: list[Example], encoder: Encoder) -> TrainingData:
    items = [encoder.encode(e.prompt, e.completion, e.label, e.location) for e in examples]
    truncated = sum(i.truncated for i in items)
    if truncated:
        log.warning(
            "%d of %d examples were truncated to data.max_length=%d",
            truncated,
            len(items),
            encoder.max_length,
        )
    return TrainingData(items, label_counts(examples), truncated)


def load_eval_prompts(cfg: DataConfig, encoder: Encoder, limit: int) -> list[list[int]]:
    """The first `limit` distinct prompts of the held-out split, as token ids ready for generation."""
    rows = read_rows(cfg.eval or cfg.train, cfg.eval_split)
    _, parsed = parse_rows(rows, cfg.format)
    prompts: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    for item in parsed:
        ids = encoder.prompt_ids(item.prompt, item.location)
        if tuple(ids) not in seen:
            seen.add(tuple(ids))
            prompts.append(ids[-encoder.max_prompt_length :])
        if len(prompts) == limit:
            break
    return prompts


__all__ = [
    "Example",
    "Pair",
    "TrainingData",
    "encode_examples",
    "label_counts",
    "load_eval_prompts",
    "read_examples",
]
