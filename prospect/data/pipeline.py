"""From a data source to encoded training items in the shape a loss declares it needs."""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

from prospect.config import DataConfig
from prospect.data.convert import to_prompts
from prospect.data.formats import Example, Pair, Ranking
from prospect.data.shapes import SHAPES, DataShape
from prospect.data.splits import Parsed, evaluation_data, training_data
from prospect.data.tokenize import Encoded, EncodedGroup, EncodedPair, EncodedPrompt, Encoder, TrainingItem
from prospect.errors import UserError, field_error

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    items: list[TrainingItem]  # all of one kind, the loss's data shape
    counts: dict[str, int]  # e.g. {"desirable": n_D, "undesirable": n_U} or {"pairs": n}
    truncated: int


def read_training(
    cfg: DataConfig, needs: DataShape, seed: int, evaluating: bool = False
) -> list[Example] | list[Pair] | list[Ranking]:
    """Read, check and convert every training row (no tokenizer needed, so bad data fails fast). When
    `evaluating`, rows held out for evaluation are left out (splits.py)."""
    parts = [SHAPES[needs].convert(kind, parsed, cfg, seed) for kind, parsed in read_parsed(cfg, evaluating)]
    if len(parts) == 1:
        return parts[0]
    mixed = [item for part in parts for item in part]
    random.Random(seed).shuffle(mixed)  # a mixture's sources interleaved, whatever order batches take
    return mixed


def read_prompts(cfg: DataConfig, seed: int, evaluating: bool = False) -> list[Example]:
    """The distinct prompts of the training rows (read_training's "prompts" shape), to sample from."""
    return to_prompts(*one_format(read_parsed(cfg, evaluating), cfg.train, any_format=True), cfg, seed)


def read_parsed(cfg: DataConfig, evaluating: bool = False) -> list[Parsed]:
    """(format, parsed rows) of each training source, ratings checked."""
    parts = training_data(cfg, evaluating)
    for kind, parsed in parts:
        if kind == "rated":
            check_ratings(parsed, cfg)
    return parts


def one_format(parts: list[Parsed], spec: str, any_format: bool = False) -> Parsed:
    """The rows of several sources as one (format, parsed rows); prompts may come from rows of any format."""
    kinds = sorted({kind for kind, _ in parts})
    if len(kinds) > 1 and not any_format:
        raise UserError(
            f"{spec}: the sources hold rows of different formats ({', '.join(kinds)}); expected one"
        )
    return parts[0][0], [item for _, parsed in parts for item in parsed]


def check_ratings(examples: list[Example], cfg: DataConfig) -> None:
    low = -math.inf if cfg.rating_min is None else cfg.rating_min
    high = math.inf if cfg.rating_max is None else cfg.rating_max
    for e in examples:
        rating = e.require_rating()
        if not low <= rating <= high:
            raise field_error(
                e.location, "rating", f"a rating in [{cfg.rating_min}, {cfg.rating_max}]", rating
            )


def count(examples: list) -> dict[str, int]:
    if examples and isinstance(examples[0], Pair):
        return {"pairs": len(examples)}
    if examples and isinstance(examples[0], Ranking):
        return {
            "lists": len(examples),
            "comparisons": sum(len(r.completions) * (len(r.completions) - 1) // 2 for r in examples),
        }
    if examples and examples[0].rating is not None and examples[0].label is None:
        return {"rated": len(examples)}
    desirable = sum(bool(e.label) for e in examples)
    return {"desirable": desirable, "undesirable": len(examples) - desirable}


def encode_prompts(examples: list[Example], encoder: Encoder) -> list[EncodedPrompt]:
    """Prompts to sample from, each cut to its last data.max_prompt_length tokens."""
    return [
        EncodedPrompt(
            encoder.prompt_ids(e.prompt, e.location)[-encoder.max_prompt_length :],
            e.prompt,
            e.location,
            e.fields,
        )
        for e in examples
    ]


def encode_all(examples: list, encoder: Encoder, prompts_only: bool = False) -> TrainingData:
    if prompts_only:
        prompts = encode_prompts(examples, encoder)
        return TrainingData(list(prompts), {"prompts": len(prompts)}, 0)
    items: list[Encoded] | list[EncodedPair] | list[EncodedGroup]
    if examples and isinstance(examples[0], Pair):
        pairs = [encoder.encode_pair(p.prompt, p.chosen, p.rejected, p.location) for p in examples]
        for pair_item, pair in zip(pairs, examples):
            pair_item.agreement = pair.agreement
        items = pairs
    elif examples and isinstance(examples[0], Ranking):
        items = [encoder.encode_group(r.prompt, r.completions, r.location, r.scores) for r in examples]
    else:
        singles = [encoder.encode(e.prompt, e.completion, e.label, e.location) for e in examples]
        for item, example in zip(singles, examples):
            item.rating, item.agreement = example.rating, example.agreement
        items = singles
    truncated = sum(i.truncated for i in items)
    if truncated:
        log.warning(
            "%d of %d examples were truncated to data.max_length=%d",
            truncated,
            len(items),
            encoder.max_length,
        )
    return TrainingData(list(items), count(examples), truncated)


def load_eval_prompts(cfg: DataConfig, encoder: Encoder, limit: int) -> list[EncodedPrompt]:
    """The first `limit` distinct prompts of the held-out data, ready for generation, with their fields."""
    return encode_prompts(read_eval_prompts(cfg, limit), encoder)


def read_eval_prompts(cfg: DataConfig, limit: int) -> list[Example]:
    """The first `limit` distinct prompts of the held-out data, with their fields."""
    return to_prompts(*read_heldout_parsed(cfg, any_format=True), cfg, 0)[:limit]


def read_heldout(cfg: DataConfig, needs: DataShape, seed: int) -> list[Example] | list[Pair] | list[Ranking]:
    """The held-out rows in the loss's shape, as read_training reads the training rows (the held-out loss)."""
    return SHAPES[needs].convert(*read_heldout_parsed(cfg), cfg, seed)


def read_heldout_parsed(cfg: DataConfig, any_format: bool = False) -> tuple[str, list]:
    """(format, parsed rows) of the held-out data (splits.py says which): every held-out reader goes through
    here."""
    return one_format(evaluation_data(cfg), cfg.eval or cfg.train, any_format)
