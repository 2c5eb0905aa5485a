"""`prospect feedback`: look at feedback from many raters before training on it. How far the raters agree
(Krippendorff's alpha with a bootstrap interval), what they say together about each item, which named raters
stand apart, what else than quality the labels could teach (an unbalanced label, a length gap, texts shared by
the train and held-out splits, a few prolific raters or prompts), and how AI judges compare with the people.

Feedback comes in one of four shapes (FORMATS), told apart by the first row's fields; every row must have
the same shape. This module reads the data and puts the numbers (feedback_checks.py) together into one JSON
report; prospect.report.feedback prints it as a table and renders it as HTML."""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prospect.config import DataConfig
from prospect.data import vader
from prospect.data.formats import Text, check_text, number, pair_agreement, parse_paired, rater_id
from prospect.data.row import Row
from prospect.data.sources import has_splits, read_rows
from prospect.data.splits import held_out, read_split
from prospect.errors import UserError, field_error
from prospect.evaluation import feedback_checks as checks
from prospect.io import write_text_atomic

KIND = "feedback"  # the JSON's "kind"
VADER = "vader-movies"  # the built-in: with --corpora, any of the VADER study's four corpora
SPLITS = ("train", "test", "all")
FORMATS = {  # format -> (the field that tells it, its rows)
    "ratings": (
        "ratings",
        "{prompt, completion, ratings: [numbers]}: each item's raw ratings, raters unnamed",
    ),
    "rater": ("rater", "{prompt, completion, rating, rater}: one rating a row by a named rater"),
    "votes": ("votes_chosen", "{prompt, chosen, rejected, votes_chosen, votes_rejected}: vote counts"),
    "labels": ("labels", "{prompt, completion, labels: {judge: label}}: several judges' labels"),
}
DEFAULTS = DataConfig()  # the thresholds and held-out share training uses


@dataclass
class Item:
    """One rated completion (or pair) and every mark it got, in the order read."""

    id: str
    location: str  # where it was first read
    prompt: Text  # "" when the data has none
    completion: Text  # a pair's chosen side
    texts: list[str]  # as plain text: the completion, or the chosen and the rejected side
    group: str  # the row's `source` (or `domain`): a VADER corpus
    split: str | None  # train or test; None until the held-out hash decides, for data without splits
    values: list[Any] = field(default_factory=list)  # ratings (votes: +1 chosen, -1 rejected) or labels
    raters: list[str] = field(default_factory=list)  # who gave each value; empty: raters unnamed
    fields: dict[str, Any] = field(default_factory=dict)  # the first row's fields, for verifier judges


@dataclass
class Feedback:
    source: str
    format: str
    items: list[Item]

    @property
    def numeric(self) -> bool:
        return self.format != "labels"


@dataclass
class FeedbackRequest:
    data: str = VADER
    split: str = "all"
    corpora: list[str] | None = None  # VADER corpora (default: all four)
    judges: str = "vader"  # comma-separated scoring judges, or "none"
    resamples: int = 1000  # bootstrap resamples of the items
    seed: int = 0
    output: str | None = None  # the JSON report
    overwrite: bool = False


# ----- reading --------------------------------------------------------------------------------------------


def read_feedback(spec: str, split: str = "all", corpora: list[str] | None = None) -> Feedback:
    """Every item of `spec` in `split` with its marks. Data without splits (one file) is split as training
    splits it: a fixed share of prompts, by a hash of the prompt, is held out (`test`)."""
    if split not in SPLITS:
        raise UserError(f"--split {split}: expected one of {', '.join(SPLITS)}")
    if spec == VADER:
        rows = vader_rows(corpora or list(vader.CORPORA))
    elif corpora:
        raise UserError(f"--corpora picks corpora of the VADER study ({VADER}); {spec} has none")
    elif has_splits(spec):
        names = ("train", "test") if split == "all" else (split,)
        rows = [(row, name) for name in names for row in read_split(spec, name, None, "--split").rows]
    else:
        rows = [(row, None) for row in read_rows(spec)]
    form = detect_format(rows[0][0])
    items = parse_items(rows, form, Path(spec).name)
    kept = [item for item in items if split in ("all", item.split)]
    if not kept:
        raise UserError(f"{spec}: none of its {len(items)} items is in split '{split}'")
    return Feedback(spec, form, kept)


def detect_format(row: Row) -> str:
    for name, (key, _) in FORMATS.items():
        if key in row.values or (name == "votes" and "votes_rejected" in row.values):
            return name
    shapes = "; ".join(shape for _, shape in FORMATS.values())
    raise field_error(
        row.location, "ratings", f"a list of ratings, or feedback in one of these shapes: {shapes}"
    )


def parse_items(rows: list[tuple[Row, str | None]], form: str, default_group: str) -> list[Item]:
    """Rows merged into items: rows sharing an `id` (or, one rating a row, a prompt and completion) are one."""
    items: dict[str, Item] = {}
    rated_at: dict[tuple[str, str], str] = {}  # (item, rater) -> where that rater rated it
    key_field, shape = FORMATS[form]
    for row, split in rows:
        if key_field not in row.values and not (form == "votes" and "votes_rejected" in row.values):
            raise field_error(row.location, key_field, f"a row like the first one, {shape}")
        prompt, completion, texts = row_texts(row, form)
        key = item_key(row, form, prompt, completion)
        item = items.setdefault(
            key,
            Item(
                key,
                row.location,
                prompt,
                completion,
                texts,
                group_of(row, default_group),
                split,
                fields=row.values,
            ),
        )
        if item.texts != texts:
            raise field_error(row.location, "completion", f"the text item {key} has at {item.location}")
        values, raters = row_marks(row, form)
        for rater in raters:
            if (key, rater) in rated_at:
                name, first = "rater" if form == "rater" else f"labels.{rater}", rated_at[key, rater]
                raise field_error(
                    row.location, name, f"one mark per rater and item ({rater} marked it at {first})"
                )
            rated_at[key, rater] = row.location
        item.values += values
        item.raters += raters
    for item in items.values():
        if item.split is None:
            item.split = "test" if held_out(item, DEFAULTS.held_out_percent) else "train"
    return list(items.values())


def plain(text: Text) -> str:
    return text if isinstance(text, str) else "\n".join(m["content"] for m in text)


def row_texts(row: Row, form: str) -> tuple[Text, Text, list[str]]:
    """The prompt (optional), the completion, and the texts as plain text."""
    if form == "votes":
        pair = parse_paired(row)  # also checks the vote counts
        return pair.prompt, pair.chosen, [plain(pair.chosen), plain(pair.rejected)]
    values = row.values
    prompt = check_text(row, "prompt", values["prompt"]) if values.get("prompt") not in (None, "") else ""
    if "completion" not in values:
        raise field_error(row.location, "completion", "the rated text, or a list of {role, content} messages")
    completion = check_text(row, "completion", values["completion"], completion=True)
    return prompt, completion, [plain(completion)]


def item_key(row: Row, form: str, prompt: Text, completion: Text) -> str:
    ident = row.values.get("id")
    if isinstance(ident, (str, int)) and not isinstance(ident, bool):
        return str(ident)
    if form == "rater":  # rows of one item name the same prompt and completion
        return json.dumps([prompt, completion], sort_keys=True)
    return row.location


def group_of(row: Row, default: str) -> str:
    group = row.values.get("source", row.values.get("domain"))
    return group if isinstance(group, str) and group else default


def row_marks(row: Row, form: str) -> tuple[list[Any], list[str]]:
    """The row's ratings or labels, and who gave each (named raters only)."""
    values = row.values
    if form == "ratings":
        raw = values["ratings"]
        if isinstance(raw, str):  # a CSV cell holding a list
            with contextlib.suppress(ValueError):
                raw = json.loads(raw)
        numbers = (
            [number(row, f"ratings[{i}]", v) for i, v in enumerate(raw) if v is not None]
            if isinstance(raw, list)
            else []
        )
        if not numbers:
            raise field_error(row.location, "ratings", "a non-empty list of numbers, one per rater", raw)
        return numbers, []
    if form == "rater":
        rater = rater_id(row, required=True)
        if "rating" not in values:
            raise field_error(row.location, "rating", "a number: this rater's rating")
        return [number(row, "rating", values["rating"])], [str(rater)]
    if form == "votes":
        pair_agreement(row)  # both counts given, none negative, not both 0: as training reads them
        counts = [number(row, name, values[name]) for name in ("votes_chosen", "votes_rejected")]
        for name, count in zip(("votes_chosen", "votes_rejected"), counts):
            if not count.is_integer():
                raise field_error(row.location, name, "a whole number of votes", count)
        return [1.0] * int(counts[0]) + [-1.0] * int(counts[1]), []
    labels = values["labels"]
    if not isinstance(labels, dict) or not labels:
        raise field_error(row.location, "labels", "an object {judge: label} with at least one judge", labels)
    marks = [
        (str(judge), label_text(row, str(judge), label))
        for judge, label in labels.items()
        if label is not None
    ]
    return [label for _, label in marks], [judge for judge, _ in marks]


def label_text(row: Row, judge: str, label: Any) -> str:
    """A label as text: true/false, a number as %g (1 and 1.0 are one label), or the text itself."""
    if isinstance(label, bool):
        return "true" if label else "false"
    if isinstance(label, (int, float)):
        return f"{number(row, f'labels.{judge}', label):g}"
    if isinstance(label, str) and label.strip():
        return label.strip()
    raise field_error(row.location, f"labels.{judge}", "a label: text, a number or true/false", label)


# ----- the VADER study's four corpora -----------------------------------------------------------------------


@dataclass
class Snippet:
    id: str
    text: str
    ratings: list[int]
    held_out: bool


def vader_rows(corpora: list[str]) -> list[tuple[Row, str | None]]:
    """Rows of the VADER corpora, each with its corpus as `source` and its split. The movie reviews are the
    `vader-movies` built-in as training reads it; the other corpora are rows of the same shape without a
    prompt."""
    rows: list[tuple[Row, str | None]] = []
    for corpus in corpora:
        if corpus not in vader.CORPORA:
            raise UserError(
                f"--corpora: unknown VADER corpus '{corpus}'; expected some of {', '.join(vader.CORPORA)}"
            )
        if corpus == "movieReviewSnippets":
            for split in ("train", "test"):
                rows += [
                    (Row(r.location, {**r.values, "source": corpus}), split) for r in read_rows(VADER, split)
                ]
            continue
        for s in vader_snippets(corpus):
            values = {"completion": s.text, "ratings": s.ratings, "id": f"{corpus}-{s.id}", "source": corpus}
            rows.append((Row(f"vader:{corpus}: id {s.id}", values), "test" if s.held_out else "train"))
    return rows


def vader_snippets(corpus: str) -> list[Snippet]:
    """The snippets of one corpus, with their raw ratings and the built-in's held-out split."""
    return [Snippet(t.id, t.text, t.ratings, t.held_out) for t in vader.load_ratings(corpus)]


# ----- the report ----------------------------------------------------------------------------------------------


def summarise(
    feedback: Feedback, agreed: list[checks.Consensus], resamples: int, seed: int
) -> dict[str, Any]:
    """Every number of the report but the judges', from the items and their consensus (`agreed`)."""
    items, numeric = feedback.items, feedback.numeric
    records = [{"id": i.id, "group": i.group, "split": i.split, **c.as_dict()} for i, c in zip(items, agreed)]
    report: dict[str, Any] = {
        "kind": KIND,
        "data": {
            "source": feedback.source,
            "format": feedback.format,
            "items": len(items),
            "marks": sum(len(i.values) for i in items),
            "groups": sorted({i.group for i in items}),
            "splits": dict(Counter(i.split for i in items)),
        },
        "settings": {
            "resamples": resamples,
            "seed": seed,
            "desirable_above": DEFAULTS.desirable_above,
            "undesirable_below": DEFAULTS.undesirable_below,
        },
        "agreement": agreement_by_group(feedback, resamples, seed),
        "consensus": checks.consensus_summary(agreed),
        "raters": raters_report(items, agreed, numeric, records) if any(i.raters for i in items) else None,
        "checks": bias_checks(feedback, agreed),
    }
    report["items"] = records
    return report


def groups_of(items: list[Item]) -> dict[str, list[int]]:
    """The indices of each group's items in the order first seen, then all (when there are several groups)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for n, item in enumerate(items):
        groups[item.group].append(n)
    return {**groups, "all": list(range(len(items)))} if len(groups) > 1 else {"all": list(range(len(items)))}


def agreement_by_group(feedback: Feedback, resamples: int, seed: int) -> dict[str, Any]:
    levels: tuple[checks.Level, ...] = ("interval", "ordinal") if feedback.numeric else ("nominal",)
    votes = feedback.format == "votes"
    units = [checks.oriented_votes(i.values, *i.texts) if votes else i.values for i in feedback.items]
    return {
        group: {
            level: checks.agreement([units[n] for n in members], level, resamples, seed) for level in levels
        }
        for group, members in groups_of(feedback.items).items()
    }


def raters_report(
    items: list[Item], agreed: list[checks.Consensus], numeric: bool, records: list[dict]
) -> dict[str, Any]:
    """Named raters: each one's agreement, bias, scale and correlation with the others, Dawid-Skene's label
    per item (added to `records`) and accuracy per rater, and how much the most prolific raters give."""
    marks = [(i.id, r, v) for i in items for r, v in zip(i.raters, i.values)]
    quality = checks.rater_quality(marks, numeric)
    categories = [(item, rater, checks.sign_label(v) if numeric else str(v)) for item, rater, v in marks]
    model = checks.dawid_skene(categories, {i.id: c.label for i, c in zip(items, agreed)})
    for entry in quality["raters"]:
        entry["dawid_skene_accuracy"] = model["rater_accuracy"].get(entry["rater"])
    for record in records:
        record["dawid_skene"] = model["labels"].get(record["id"])
        record["dawid_skene_posterior"] = model["posterior"].get(record["id"])
    quality["dawid_skene"] = {k: model[k] for k in ("agrees_with_consensus", "mean_posterior")}
    quality["concentration"] = checks.concentration(list(Counter(r for _, r, _ in marks).values()))
    return quality


def bias_checks(feedback: Feedback, agreed: list[checks.Consensus]) -> dict[str, Any]:
    """Label balance, the length gap (per group too: pooled groups can show a gap that none of them has),
    texts shared by the splits, and the most prolific prompts."""
    items, votes = feedback.items, feedback.format == "votes"
    above, below = DEFAULTS.desirable_above, DEFAULTS.undesirable_below
    labels = [checks.training_label(c, feedback.format, above, below) for c in agreed]
    prompts = Counter(plain(i.prompt) for i in items if i.prompt)
    return {
        "balance": checks.label_balance(labels, [i.group for i in items], flag=not votes),
        "length": {
            group: length_gap([items[n] for n in members], [labels[n] for n in members], votes)
            for group, members in groups_of(items).items()
        },
        "duplicates": checks.duplicates(
            ["\n".join(i.texts) for i in items], [str(i.split) for i in items], [i.id for i in items]
        ),
        "prompts": checks.concentration(list(prompts.values())) if prompts else None,
    }


def length_gap(items: list[Item], labels: list[bool | None], votes: bool) -> dict[str, Any]:
    """Desirable against undesirable texts; for pairs, each pair's winning side against its losing side."""
    if votes:
        decided = [
            (i.texts if label else i.texts[::-1]) for i, label in zip(items, labels) if label is not None
        ]
        return checks.length_gap([d[0] for d in decided], [d[1] for d in decided], paired=True)
    return checks.length_gap(
        [i.texts[0] for i, label in zip(items, labels) if label is True],
        [i.texts[0] for i, label in zip(items, labels) if label is False],
    )


# ----- AI judges ------------------------------------------------------------------------------------------------


def scoring_judges(names: str) -> list[str]:
    """The judges named, checked before anything is read: each must score one completion."""
    from prospect.evaluation.judges import AIJudgeOptions, check_judges

    if names.strip() in ("", "none"):
        return []
    judges = check_judges(names, AIJudgeOptions())
    for name in judges:
        if name.partition(":")[0] in ("pairwise", "llm", "http"):
            raise UserError(
                f"--judges {name}: compares two completions; prospect feedback needs judges that "
                "score one (vader, reward:PATH, verifier:MODULE:FUNCTION)"
            )
    return judges


def judge_report(feedback: Feedback, agreed: list[checks.Consensus], names: list[str]) -> dict[str, Any]:
    """Each judge's scores of the items against the human consensus (for pairs: the chosen side's score
    minus the rejected side's, against the mean vote), overall and per group, with its calibration curve."""
    import torch

    from prospect.data.tokenize import EncodedPrompt
    from prospect.evaluation.judges import AIJudgeOptions, load_judge

    if names and not feedback.numeric:
        print("judges: skipped; labels have no numeric consensus to compare judges' scores with", flush=True)
    if not names or not feedback.numeric:
        return {}
    items = feedback.items
    human = [c.mean or 0.0 for c in agreed]
    out = {}
    for name in names:
        judge = load_judge(name, AIJudgeOptions(), torch.device("cpu"), False)
        assert judge.score is not None  # scoring_judges let only scoring judges through
        print(f"judging {len(items)} items with {name} ...", flush=True)
        prompts = [EncodedPrompt([], i.prompt, i.location, i.fields) for i in items]
        sides = [judge.score([i.texts[k] for i in items], prompts) for k in range(len(items[0].texts))]
        scores = [a - b for a, b in zip(*sides)] if len(sides) == 2 else sides[0]
        result = checks.judge_agreement(scores, human)
        groups = {g: members for g, members in groups_of(items).items() if g != "all"}
        if groups:
            result["groups"] = {
                g: checks.judge_agreement([scores[n] for n in members], [human[n] for n in members])
                for g, members in groups.items()
            }
        result["calibration"] = checks.calibration_curve(scores, human)
        out[name] = result
    return out


def run_feedback(request: FeedbackRequest) -> dict[str, Any]:
    """Read and measure, and write the JSON report when `request.output` names one (prospect.report.feedback
    prints it as a table and renders it as HTML)."""
    out = Path(request.output) if request.output else None
    if out is not None and out.exists() and not request.overwrite:
        raise UserError(f"{out}: exists; pass --overwrite to replace it")
    if request.resamples < 1:
        raise UserError(f"--bootstrap {request.resamples}: expected a number of resamples >= 1")
    names = scoring_judges(request.judges)
    feedback = read_feedback(request.data, request.split, request.corpora)
    print(
        f"{feedback.source}: {len(feedback.items)} items ({feedback.format}); measuring agreement with "
        f"{request.resamples} bootstrap resamples ...",
        flush=True,
    )
    agreed = [checks.consensus(i.values, feedback.numeric) for i in feedback.items]
    report = summarise(feedback, agreed, request.resamples, request.seed)
    report["judges"] = judge_report(feedback, agreed, names)
    report["flags"] = checks.findings(report["checks"], (report["raters"] or {}).get("raters", []))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(report, indent=1))
        print(f"wrote {out}", flush=True)
    return report
