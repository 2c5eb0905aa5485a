"""Turn feedback of one shape into the shape a loss needs.

| have \\ need    | unpaired (KTO, CSFT)            | paired (DPO, IPO, SimPO, ...)          | completions (SFT)    |
|----------------|---------------------------------|----------------------------------------|----------------------|
| unpaired       | as is                           | desirable x undesirable, same prompt   | desirable ones       |
| paired         | both sides (or one per prompt)  | as is                                  | chosen ones          |
| rated          | label by thresholds             | same prompt, rating gap >= min gap     | above the threshold  |
| ranked         | via its pairs                   | all K-choose-2 pairs                   | the best one         |
| completions    | (no labels: error)              | (no labels: error)                     | as is                |
| text, messages | (no labels: error)              | (no labels: error)                     | as is, or per turn   |

A pairwise preference model (loss `preference`) reads duels: each pair as the prompt followed by both
completions (`duel_text`), in both orders, labelled by whether the first is preferred.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from typing import TypeVar, cast

from prospect.config import DataConfig
from prospect.data.formats import Example, Messages, Pair, Ranking, Text
from prospect.errors import UserError

Item = TypeVar("Item", Example, Pair)


def to_unpaired(kind: str, parsed: list, cfg: DataConfig, seed: int) -> list[Example]:
    rng = random.Random(seed)
    if kind == "unpaired":
        examples = list(parsed)
    elif kind == "rated" and cfg.ratings_for_unpaired == "labels":
        examples = [labelled(e, cfg) for e in parsed]
        examples = [e for e in examples if e.label is not None]
    elif kind in ("paired", "ranked", "rated"):
        pairs = to_pairs(kind, parsed, cfg, seed) if kind != "paired" else parsed
        examples = unpair(pairs, cfg.unpaired_from_pairs, rng)
        rng.shuffle(examples)  # no blocks of one label, whatever order batches are later drawn in
    else:  # completions or prompts
        raise UserError(
            f"{cfg.train}: {kind} rows carry no desirable/undesirable signal; this loss needs labels, "
            "ratings, pairs or rankings"
        )
    return subsample(agreeing(examples, cfg), cfg, rng)


def agreeing(items: list[Item], cfg: DataConfig) -> list[Item]:
    """The examples or pairs whose raters agree with them at least data.min_agreement (unknown: kept)."""
    if cfg.min_agreement <= 0:
        return items
    kept = [it for it in items if it.agreement is None or it.agreement >= cfg.min_agreement]
    if not kept:
        raise UserError(
            f"{cfg.train}: data.min_agreement={cfg.min_agreement:g} leaves no example (raters never agree "
            "that much); lower it"
        )
    return kept


def to_pairs(kind: str, parsed: list, cfg: DataConfig, seed: int) -> list[Pair]:
    rng = random.Random(seed)
    if kind == "paired":
        pairs = list(parsed)
    elif kind == "ranked":
        pairs = ranked_pairs(parsed)
    elif kind in ("rated", "unpaired"):
        scored = [(e, e.rating if kind == "rated" else float(e.label)) for e in parsed]
        gap = cfg.pair_min_gap if kind == "rated" else 1.0
        pairs = pairs_by_gap(scored, gap, cfg.max_pairs_per_prompt, rng)
    else:
        raise UserError(
            f"{cfg.train}: {kind} rows carry no preference; this loss needs pairs, rankings, "
            "ratings or labels"
        )
    if not pairs and kind == "unpaired":
        raise UserError(
            f"{cfg.train}: the rows are unpaired (one labelled completion each) and no prompt has both a "
            "desirable and an undesirable completion to pair; use an unpaired loss (kto, csft) or give "
            "pairs {prompt, chosen, rejected}"
        )
    if not pairs:
        raise UserError(
            f"{cfg.train}: no preference pairs could be built (pairs need two completions of the same "
            f"prompt whose ratings differ by at least data.pair_min_gap={cfg.pair_min_gap})"
        )
    rng.shuffle(pairs)
    return agreeing(pairs, cfg)


def duel_text(first: str, second: str) -> str:
    """What a pairwise preference model reads after the prompt: the two completions, labelled A and B."""
    return f"Response A:\n{first.strip()}\n\nResponse B:\n{second.strip()}"


def completion_text(completion: Text) -> str:
    """A completion as plain text: its assistant turns' content when it is a conversation."""
    if isinstance(completion, str):
        return completion
    return "\n".join(m["content"] for m in completion if m["role"] == "assistant")


def as_completion(prompt: Text, text: str) -> Text:
    """Plain text as a completion of `prompt`: an assistant turn when the prompt is a conversation."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def to_duels(kind: str, parsed: list, cfg: DataConfig, seed: int) -> list[Example]:
    """Each preference pair (from pairs, rankings, ratings or labels, as `to_pairs`) as two duels, one per
    order: 'A: chosen, B: rejected' labelled True (A is preferred), 'A: rejected, B: chosen' False. Trained
    on both orders, the model's P(A > B) is close to 1 - P(B > A); readers average the two."""
    duels = []
    for p in to_pairs(kind, parsed, cfg, seed):
        chosen, rejected = completion_text(p.chosen), completion_text(p.rejected)
        for first, second, label in ((chosen, rejected, True), (rejected, chosen, False)):
            duels.append(
                Example(p.prompt, as_completion(p.prompt, duel_text(first, second)), label, p.location)
            )
    return duels


def to_groups(kind: str, parsed: list, cfg: DataConfig, seed: int) -> list[Ranking]:
    """Ranked lists for reward models (best first); pairs are lists of two. Scores carry margins."""
    if kind == "ranked":
        return list(parsed)
    pairs = to_pairs(kind, parsed, cfg, seed)
    return [
        Ranking(p.prompt, [p.chosen, p.rejected], p.location, None if p.margin is None else [p.margin, 0.0])
        for p in pairs
    ]


def to_rated(kind: str, parsed: list, cfg: DataConfig, seed: int) -> list[Example]:
    """Rated completions for reward regression."""
    if kind != "rated":
        raise UserError(
            f"{cfg.train}: {kind} rows have no ratings; reward regression needs {{prompt, completion, rating}}"
        )
    return list(parsed)


def to_prompts(kind: str, parsed: list, cfg: DataConfig, seed: int) -> list[Example]:
    """The distinct prompts of any rows, in order, for online methods that sample their own completions."""
    seen, prompts = set(), []
    for item in parsed:
        if not item.prompt:  # text rows, or conversations that open with the assistant
            continue
        key = prompt_key(item.prompt)
        if key not in seen:
            seen.add(key)
            prompts.append(
                Example(item.prompt, "", None, item.location, fields=getattr(item, "fields", None))
            )
    if parsed and not prompts:
        raise UserError(
            f"{parsed[0].location}: {kind} rows have no prompts to sample from; expected {{prompt}}"
        )
    return prompts


def to_completions(kind: str, parsed: list, cfg: DataConfig, seed: int) -> list[Example]:
    if kind in ("completions", "text"):
        return list(parsed)
    if kind == "messages":
        return [turn for e in parsed for turn in assistant_turns(e, cfg.assistant_only_loss)]
    if kind == "unpaired":
        return [e for e in parsed if e.label]
    if kind == "rated":
        return [e for e in parsed if e.rating > cfg.desirable_above]
    if kind == "paired":
        return [Example(p.prompt, p.chosen, True, p.location) for p in parsed]
    if kind == "ranked":
        return [Example(r.prompt, r.completions[0], True, r.location) for r in parsed]
    raise UserError(
        f"{cfg.train}: prompts rows have no completions to imitate; SFT needs {{prompt, completion}}"
    )


def assistant_turns(example: Example, only: bool) -> list[Example]:
    """A conversation as SFT examples: one per assistant message, after the conversation before it (the
    loss then covers the assistant turns alone, as TRL's assistant_only_loss), or, if not `only`, the whole
    conversation as one completion with no prompt (every token)."""
    conversation: Messages = [*cast(Messages, example.prompt), *cast(Messages, example.completion)]
    if not only:
        return [Example([], conversation, None, example.location, fields=example.fields)]
    turns = [i for i, message in enumerate(conversation) if message["role"] == "assistant"]
    return [
        Example(
            conversation[:i],
            [conversation[i]],
            None,
            example.location if len(turns) == 1 else f"{example.location} (turn {i + 1})",
            fields=example.fields,
        )
        for i in turns
    ]


def labelled(example: Example, cfg: DataConfig) -> Example:
    """A rated example labelled by the thresholds on its (mean) rating; with its raters' own ratings, their
    agreement with the label: the share rating on its side of 0, a rating of 0 counting half."""
    rating = example.require_rating()
    if rating > cfg.desirable_above:
        label = True
    elif rating < cfg.undesirable_below:
        label = False
    else:
        label = None
    ratings = raw_ratings(example)
    agreement = side_share(ratings, 1 if label else -1) if label is not None and ratings else None
    return Example(
        example.prompt, example.completion, label, example.location, example.rating, agreement=agreement
    )


def raw_ratings(example: Example) -> list[float]:
    """The individual raters' ratings of a rated row (a numeric list in its `ratings` field), or []."""
    values = (example.fields or {}).get("ratings")
    if not isinstance(values, list) or not values:
        return []
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return []
    return [float(v) for v in values]


def half_ties(a: float, b: float) -> float:
    """A comparison scored 1 if a > b, 0 if a < b, and 1/2 on a tie."""
    return 1.0 if a > b else 0.0 if a < b else 0.5


def side_share(ratings: list[float], side: int) -> float:
    """The share of `ratings` on `side` (+1 or -1) of 0, a rating of 0 counting half."""
    return sum(half_ties(r * side, 0.0) for r in ratings) / len(ratings)


def order_agreement(better: list[float], worse: list[float]) -> float:
    """The chance that a rating of the better completion exceeds one of the worse, ties half: with a different
    set of raters per completion (as in the VADER study), the share of raters' comparisons it wins."""
    return sum(half_ties(b, w) for b in better for w in worse) / (len(better) * len(worse))


def unpair(pairs: list[Pair], mode: str, rng: random.Random) -> list[Example]:
    """'both' sides of each pair; 'one' side picked at random (one completion per prompt, as in the KTO
    paper's experiment without paired data); or only the 'chosen' / 'rejected' sides."""
    examples = []
    for pair in pairs:
        sides = {"both": (True, False), "chosen": (True,), "rejected": (False,)}.get(mode) or (
            rng.random() < 0.5,
        )
        for desirable in sides:
            completion = pair.chosen if desirable else pair.rejected
            examples.append(
                Example(pair.prompt, completion, desirable, pair.location, agreement=pair.agreement)
            )
    return examples


def subsample(examples: list[Example], cfg: DataConfig, rng: random.Random) -> list[Example]:
    """Keep `desirable_fraction` of the desirable and `undesirable_fraction` of the undesirable examples."""
    if cfg.desirable_fraction >= 1 and cfg.undesirable_fraction >= 1:
        return examples
    kept = []
    for label, fraction in ((True, cfg.desirable_fraction), (False, cfg.undesirable_fraction)):
        group = [e for e in examples if e.label == label]
        kept += rng.sample(group, round(len(group) * fraction)) if fraction < 1 else group
    return kept


def ranked_pairs(rankings: list[Ranking]) -> list[Pair]:
    """Every (better, worse) combination of each ranked list: K-choose-2 pairs."""
    return [
        Pair(
            r.prompt,
            r.completions[i],
            r.completions[j],
            f"{r.location} (ranks {i + 1}>{j + 1})",
            None if r.scores is None else r.scores[i] - r.scores[j],
        )
        for r in rankings
        for i, j in itertools.combinations(range(len(r.completions)), 2)
    ]


def pairs_by_gap(
    scored: list[tuple[Example, float]], min_gap: float, per_prompt: int, rng: random.Random
) -> list[Pair]:
    """Pairs of completions of the same prompt whose scores differ by at least `min_gap` (higher wins);
    at most `per_prompt` of them per prompt (0: all), drawn at random."""
    groups: dict[str, list[tuple[Example, float]]] = defaultdict(list)
    for example, score in scored:
        groups[prompt_key(example.prompt)].append((example, score))
    pairs = []
    for members in groups.values():
        candidates = [
            ((a, sa), (b, sb)) if sa > sb else ((b, sb), (a, sa))
            for (a, sa), (b, sb) in itertools.combinations(members, 2)
            if abs(sa - sb) >= min_gap and completion_key(a.completion) != completion_key(b.completion)
        ]
        if per_prompt and len(candidates) > per_prompt:
            candidates = rng.sample(candidates, per_prompt)
        for (w, sw), (lo, sl) in candidates:
            raw_w, raw_lo = raw_ratings(w), raw_ratings(lo)
            agreement = order_agreement(raw_w, raw_lo) if raw_w and raw_lo else None
            pairs.append(
                Pair(
                    w.prompt, w.completion, lo.completion, f"{w.location} > {lo.location}", sw - sl, agreement
                )
            )
    return pairs


def prompt_key(prompt: Text) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


completion_key = prompt_key
