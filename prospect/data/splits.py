"""What trains and what evaluates, from one source or a weighted mixture of several.

Data with splits (built-ins, the hub, datasets saved with splits) trains on `data.train_split` and evaluates
on `data.eval_split`. Data with no splits (one file, a dataset saved without splits) that evaluates on itself
is split by a hash of each row's prompt, as the VADER built-in splits its snippets: `data.held_out_percent`
of the prompts evaluate and never train, whatever the row order or the seed. `data.eval_split=held-out`
asks for that share of any data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prospect.config import DataConfig, EvalConfig
from prospect.data.convert import completion_key, prompt_key
from prospect.data.formats import parse_rows, rater_id
from prospect.data.row import Row
from prospect.data.sources import NoSuchSplit, Source, has_splits, read_source
from prospect.errors import UserError

log = logging.getLogger(__name__)

HELD_OUT = "held-out"
Parsed = tuple[str, list]  # (format, parsed rows) of one source


@dataclass(frozen=True)
class Component:
    spec: str
    weight: float | None  # its share of the mixture before normalising; None: all of its rows


def components(spec: str) -> list[Component]:
    """`a.jsonl:2, org/name:1` -> the sources and their weights; one source (or an existing path) alone."""
    if Path(spec).exists():
        return [Component(spec, None)]
    out = []
    for part in (p.strip() for p in spec.split(",")):
        name, weight = part, None
        head, colon, tail = part.rpartition(":")
        if colon and head:
            with contextlib.suppress(ValueError):
                name, weight = head, float(tail)
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise UserError(f"data.train: '{part}': expected a weight > 0 after the colon")
        if not name:
            raise UserError(f"data.train: '{spec}': expected sources separated by commas, none empty")
        out.append(Component(name, weight))
    if len({c.weight is None for c in out}) > 1:
        raise UserError(f"data.train: '{spec}': give every source a weight, or none (all rows of each)")
    return out


def evaluates(cfg: EvalConfig) -> bool:
    """Whether a run reads held-out data: sampled evaluation, or a periodic held-out loss."""
    return cfg.num_prompts > 0 or (cfg.every > 0 and cfg.loss_rows > 0)


def held_out(item: Any, percent: float) -> bool:
    """Whether a parsed row's prompt (a prompt-less row's text) falls in the held-out share."""
    key = prompt_key(item.prompt) if item.prompt else completion_key(item.completion)
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % 10_000 < percent * 100


def training_data(cfg: DataConfig, evaluating: bool) -> list[Parsed]:
    """Each training source's (format, parsed rows), weighted; when `evaluating`, without the rows whose
    prompts are held out for evaluation."""
    shared = cfg.eval is None or cfg.eval == cfg.train
    parts: list[Parsed] = []
    mixture = components(cfg.train)
    for c in mixture:
        source = read_split(c.spec, cfg.train_split, cfg.subset, "data.train_split")
        rows = source.rows[: cfg.limit or None]
        kind, parsed = parse_rows(rows, cfg.format)
        if cfg.max_per_rater:
            parsed = rater_balanced(rows, parsed, cfg.max_per_rater, c.spec)
        if evaluating and (cfg.eval_split == HELD_OUT or (shared and source.split is None)):
            kept = [p for p in parsed if not held_out(p, cfg.held_out_percent)]
            if not kept:
                raise UserError(
                    f"{c.spec}: the prompts of all {len(parsed)} rows fall in the held-out share "
                    f"(data.held_out_percent={cfg.held_out_percent:g}); add rows, give held-out data in "
                    "data.eval, or set eval.num_prompts=0"
                )
            say_once(
                f"{c.spec}: {len(parsed) - len(kept)} of {len(parsed)} rows set aside for evaluation (their "
                f"prompts are in the {cfg.held_out_percent:g}% held-out share, by prompt hash); training never "
                "sees them"
            )
            parsed = kept
        parts.append((kind, parsed))
    return weighted(parts, mixture)


def rater_balanced(rows: list[Row], parsed: list, cap: int, spec: str) -> list:
    """At most `cap` parsed rows of each rater (a row's `rater` field; rows without one are all kept). A
    rater's kept rows are those whose content hashes lowest: the same whatever the row order or the seed."""
    raters = [rater_id(row) for row in rows]
    if all(r is None for r in raters):
        raise UserError(
            f"{spec}: data.max_per_rater needs rows that name their rater in a 'rater' field; none do"
        )
    by_rater: dict[str, list[int]] = {}
    for i, rater in enumerate(raters):
        if rater is not None:
            by_rater.setdefault(rater, []).append(i)
    dropped: set[int] = set()
    for indices in by_rater.values():
        ranked = sorted(indices, key=lambda i: (content_hash(rows[i]), i))
        dropped.update(ranked[cap:])
    capped = sorted((len(v) for v in by_rater.values() if len(v) > cap), reverse=True)
    if capped:
        say_once(
            f"{spec}: data.max_per_rater={cap} keeps {len(rows) - len(dropped)} of {len(rows)} rows; "
            f"{len(capped)} of {len(by_rater)} raters had more (the most prolific {capped[0]})"
        )
    return [p for i, p in enumerate(parsed) if i not in dropped]


def content_hash(row: Row) -> int:
    return zlib.crc32(json.dumps(row.values, sort_keys=True, default=str).encode("utf-8", "surrogatepass"))


def weighted(parts: list[Parsed], mixture: list[Component]) -> list[Parsed]:
    """As TRL's dataset mixtures: weights normalised to shares, the largest mixture that repeats no source,
    the first rows of each."""
    weights = [c.weight for c in mixture if c.weight is not None]
    if len(weights) < len(mixture):
        return parts
    shares = [w / sum(weights) for w in weights]
    total = min(len(parsed) / share for (_, parsed), share in zip(parts, shares))
    mixed = [(kind, parsed[: round(share * total)]) for (kind, parsed), share in zip(parts, shares)]
    say_once("data mixture: " + ", ".join(f"{len(p)} rows of {c.spec}" for (_, p), c in zip(mixed, mixture)))
    return mixed


def evaluation_data(cfg: DataConfig) -> list[Parsed]:
    """Each evaluation source's (format, parsed rows), and a log line saying where they came from."""
    spec = cfg.eval or cfg.train
    shared = cfg.eval is None or cfg.eval == cfg.train
    share = cfg.eval_split == HELD_OUT
    parts: list[Parsed] = []
    for c in components(spec):
        split = cfg.train_split if share else cfg.eval_split
        source = read_split(c.spec, split, evaluation_subset(cfg), "data.eval_split")
        kind, parsed = parse_rows(source.rows, cfg.format)
        if share or (shared and source.split is None):
            total = len(parsed)
            parsed = [p for p in parsed if held_out(p, cfg.held_out_percent)]
            if not parsed:
                raise UserError(
                    f"{c.spec}: none of its {total} rows has a prompt in the held-out share "
                    f"(data.held_out_percent={cfg.held_out_percent:g}); raise it, give held-out data in "
                    "data.eval, or set eval.num_prompts=0"
                )
            origin = f"the held-out share of {c.spec} ({cfg.held_out_percent:g}% of prompts, by hash)"
        elif source.split is None:
            origin = f"all of {c.spec} (it has no splits)"
        else:
            origin = f"{c.spec}, split '{source.split}'"
        say_once(f"evaluation data: {len(parsed)} rows from {origin}")
        parts.append((kind, parsed))
    return parts


SAID: set[str] = set()


def say_once(message: str) -> None:
    """Log a line the first time only: evaluations and online rounds read the same data again."""
    if message not in SAID:
        SAID.add(message)
        log.info(message)


def evaluation_subset(cfg: DataConfig) -> str | None:
    """The config (subset) of the evaluation data: `eval_subset`, or `subset` when evaluating on `train`."""
    return cfg.eval_subset or (cfg.subset if cfg.eval is None or cfg.eval == cfg.train else None)


def read_split(spec: str, split: str, subset: str | None, option: str) -> Source:
    try:
        return read_source(spec, split, subset)
    except NoSuchSplit as exc:
        hint = f"; set {option} to one of them"
        if option == "data.eval_split":
            hint += f" or to '{HELD_OUT}' (a share of the training split, by prompt hash), or give data.eval"
        raise UserError(f"{exc}{hint}") from None


def same_evaluation(cfg: DataConfig) -> tuple[str, str]:
    """(eval, eval_split) that give a run training on other data the evaluation rows `cfg` gives: an
    online loop's runs train on samples of `cfg.train`'s prompts and must evaluate on its held-out rows."""
    if (cfg.eval is not None and cfg.eval != cfg.train) or cfg.eval_split == HELD_OUT:
        return cfg.eval or cfg.train, cfg.eval_split
    split = {has_splits(c.spec) for c in components(cfg.train)}
    if split == {False}:
        return cfg.train, HELD_OUT
    if split == {True}:
        return cfg.train, cfg.eval_split
    raise UserError(
        f"data.train: '{cfg.train}' mixes sources with and without splits; give held-out data in data.eval, "
        f"or set data.eval_split={HELD_OUT}"
    )
