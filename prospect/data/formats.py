"""Feedback rows in the shapes users collect, checked field by field and normalised.

- unpaired (thumbs up/down): {prompt, completion, label: bool or 0/1}; HALOs' binary feedback
  {prompt, output, label} too
- paired (comparisons): {prompt, chosen, rejected}; pairs may leave the prompt implicit as the longest
  shared opening of `chosen` and `rejected` (TRL's extract_prompt); HALOs' pairwise feedback
  {prompt, output_A, output_B, label} (label 1: A is preferred, 0: B is)
- rated (scores, e.g. a mean of several raters): {prompt, completion, rating: number}
- ranked (InstructGPT-style lists): {prompt, ranking: [best, ..., worst]}
- completions (demonstrations, for SFT): {prompt, completion}
- text and messages (TRL's language modelling, for SFT): {text} and {messages}; the prompt of a
  conversation is everything before its last assistant message
Text fields are strings (plain text) or lists of {role, content} messages (conversational).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Union

from prospect.data.sources import Row
from prospect.errors import UserError, field_error

Messages = list[dict[str, str]]
Text = Union[str, Messages]  # noqa: UP007 (a runtime alias)

FORMATS = ("unpaired", "paired", "rated", "ranked", "completions", "text", "messages", "prompts")
FIELDS = {
    "unpaired": ("prompt", "completion", "label"),
    "paired": ("prompt", "chosen", "rejected"),
    "rated": ("prompt", "completion", "rating"),
    "ranked": ("prompt", "ranking"),
    "completions": ("prompt", "completion"),
    "text": ("text",),
    "messages": ("messages",),
    "prompts": ("prompt",),
}
HALOS_PAIR = ("prompt", "output_A", "output_B", "label")


@dataclass
class Example:
    """One completion, with a desirable (True) / undesirable (False) label and/or a rating when known."""

    prompt: Text
    completion: Text
    label: bool | None
    location: str
    rating: float | None = None
    fields: dict | None = None  # the row's other fields (e.g. a reference answer for a verifier)
    agreement: float | None = None  # the share of raters whose own verdict is this label (when known)

    def require_rating(self) -> float:
        """The rating of a rated row (parsing sets one on every rated row)."""
        if self.rating is None:
            raise ValueError(f"{self.location}: expected a rated row; this one has no rating")
        return self.rating


@dataclass
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text
    location: str
    margin: float | None = None  # how much better chosen is (a rating gap, or Llama 2's margin label)
    agreement: float | None = None  # the share of raters who preferred chosen, ties half (when known)


@dataclass
class Ranking:
    prompt: Text
    completions: list[Text]  # best first
    location: str
    scores: list[float] | None = None  # optional ratings of the completions, for margins


def detect_format(rows: list[Row], requested: str) -> str:
    if requested != "auto":
        return requested
    keys = set(rows[0].values)
    if {"chosen", "rejected"} <= keys or {"output_A", "output_B"} <= keys:
        return "paired"
    if "ranking" in keys:
        return "ranked"
    if {"completion", "label"} <= keys or {"output", "label"} <= keys:
        return "unpaired"
    if {"completion", "rating"} <= keys:
        return "rated"
    if "completion" in keys:
        return "completions"
    for kind in ("messages", "text"):
        if kind in keys:
            return kind
    if "prompt" in keys:
        return "prompts"
    shapes = "; ".join(f"{{{', '.join(f)}}} ({name})" for name, f in FIELDS.items())
    raise UserError(
        f"{rows[0].location}: cannot tell the data format from fields {sorted(keys)}; expected {shapes}"
    )


def require(row: Row, kind: str, names: tuple[str, ...] | None = None) -> None:
    names = names or FIELDS[kind]
    for name in names:
        if name not in row.values and not (kind == "paired" and name == "prompt"):
            raise field_error(row.location, name, f"a value ({kind} rows have {', '.join(names)})")


def parse_example(row: Row, kind: str) -> Example:
    """An unpaired, rated, completions, text, messages or prompts row."""
    if kind in ("text", "messages"):
        return parse_language_modelling(row, kind)
    reject_mixed(row, "completion", "chosen")
    values = row.values
    output = "output" if "output" in values and "completion" not in values else "completion"  # HALOs
    require(row, kind, tuple(output if name == "completion" else name for name in FIELDS[kind]))
    label, rating = None, None
    if kind == "unpaired":
        label = binary(row, "label")
    if kind == "rated":
        rating = number(row, "rating", values["rating"])
    prompt = check_text(row, "prompt", values["prompt"])
    fields = {k: v for k, v in values.items() if k not in ("prompt", output)}
    if kind == "prompts":
        return Example(prompt, "", None, row.location, None, fields)
    completion = check_text(row, output, values[output], completion=True)
    prompt, completion = align_kinds(prompt, completion)
    agreement = share(row, "agreement") if kind == "unpaired" and "agreement" in values else None
    return Example(prompt, completion, label, row.location, rating, fields, agreement)


def binary(row: Row, name: str) -> bool:
    """A label: a boolean, or the integer 0 or 1."""
    value = row.values[name]
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise field_error(row.location, name, "a boolean (true or false) or 0/1", value)


def parse_language_modelling(row: Row, kind: str) -> Example:
    """{text}: every token is trained on. {messages}: the prompt is everything before the last assistant
    message, and convert.py decides which turns carry the loss."""
    require(row, kind)
    value = row.values[kind]
    fields = {k: v for k, v in row.values.items() if k != kind}
    if kind == "text":
        if not isinstance(value, str):
            raise field_error(row.location, "text", "text (conversations go in a 'messages' field)", value)
        return Example("", check_text(row, "text", value), None, row.location, fields=fields)
    if not isinstance(value, list):
        raise field_error(row.location, "messages", "a list of {role, content} messages", value)
    check_text(row, "messages", value, completion=True)
    turns = [i for i, message in enumerate(value) if message["role"] == "assistant"]
    if not turns:
        raise field_error(row.location, "messages", "at least one message with role 'assistant'", value)
    return Example(value[: turns[-1]], value[turns[-1] :], None, row.location, fields=fields)


def parse_paired(row: Row) -> Pair:
    values = row.values
    if "output_A" in values and "chosen" not in values:
        return parse_halos_pair(row)
    reject_mixed(row, "chosen", "completion")
    require(row, "paired")
    chosen = check_text(row, "chosen", values["chosen"], completion="prompt" in values)
    rejected = check_text(row, "rejected", values["rejected"], completion="prompt" in values)
    if "prompt" in values:
        prompt = check_text(row, "prompt", values["prompt"])
    else:
        prompt, chosen, rejected = split_implicit_prompt(row, chosen, rejected)
    prompt, chosen = align_kinds(prompt, chosen)
    _, rejected = align_kinds(prompt, rejected)
    margin = None
    if "margin" in values:
        margin = number(row, "margin", values["margin"])
        if margin < 0:
            raise field_error(row.location, "margin", "a number >= 0 (how much better chosen is)", margin)
    return Pair(prompt, chosen, rejected, row.location, margin, pair_agreement(row))


def share(row: Row, name: str) -> float:
    """A share of raters, a number in [0, 1]."""
    value = number(row, name, row.values[name])
    if not 0 <= value <= 1:
        raise field_error(row.location, name, "a share of raters in [0, 1]", value)
    return value


def pair_agreement(row: Row) -> float | None:
    """The share of raters who preferred chosen: `agreement`, or votes_chosen / (votes_chosen + votes_rejected)."""
    values = row.values
    if "agreement" in values:
        return share(row, "agreement")
    if "votes_chosen" not in values and "votes_rejected" not in values:
        return None
    votes = []
    for name in ("votes_chosen", "votes_rejected"):
        if name not in values:
            raise field_error(row.location, name, "a count of votes (rows with votes give both sides)")
        count = number(row, name, values[name])
        if count < 0:
            raise field_error(row.location, name, "a count of votes >= 0", count)
        votes.append(count)
    if sum(votes) == 0:
        raise field_error(row.location, "votes_chosen", "at least one vote on either side", 0)
    return votes[0] / sum(votes)


def parse_halos_pair(row: Row) -> Pair:
    """HALOs' pairwise feedback: label 1 means output_A is preferred, 0 that output_B is."""
    require(row, "paired", HALOS_PAIR)
    values = row.values
    prompt = check_text(row, "prompt", values["prompt"])
    a = check_text(row, "output_A", values["output_A"], completion=True)
    b = check_text(row, "output_B", values["output_B"], completion=True)
    chosen, rejected = (a, b) if binary(row, "label") else (b, a)
    prompt, chosen = align_kinds(prompt, chosen)
    _, rejected = align_kinds(prompt, rejected)
    return Pair(prompt, chosen, rejected, row.location)


def number(row: Row, name: str, value: Any) -> float:
    """A finite number; text that reads as one (CSV cells) counts."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise field_error(row.location, name, "a finite number", value)
    return float(value)


def parse_ranked(row: Row) -> Ranking:
    require(row, "ranked")
    ranking = row.values["ranking"]
    if not isinstance(ranking, list) or len(ranking) < 2:
        raise field_error(row.location, "ranking", "a list of at least 2 completions, best first", ranking)
    prompt = check_text(row, "prompt", row.values["prompt"])
    completions = []
    for index, item in enumerate(ranking):
        prompt, completion = align_kinds(prompt, check_text(row, f"ranking[{index}]", item, completion=True))
        completions.append(completion)
    scores = None
    if "scores" in row.values:
        raw = row.values["scores"]
        if not isinstance(raw, list) or len(raw) != len(ranking):
            raise field_error(
                row.location, "scores", f"a list of {len(ranking)} numbers, one per ranked completion", raw
            )
        scores = [number(row, f"scores[{i}]", v) for i, v in enumerate(raw)]
        if any(a < b for a, b in itertools.pairwise(scores)):
            raise field_error(
                row.location, "scores", "scores that do not increase down the ranking (best first)", raw
            )
    return Ranking(prompt, completions, row.location, scores)


def reject_mixed(row: Row, own: str, other: str) -> None:
    if own in row.values and other in row.values:
        raise UserError(f"{row.location}: has both '{own}' and '{other}'; a row is either unpaired or paired")


def check_text(row: Row, name: str, value: Any, completion: bool = False) -> Text:
    """A non-empty string, or a non-empty list of {role, content} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise field_error(row.location, name, "non-empty text", value)
        return value
    if isinstance(value, list) and value:
        for index, message in enumerate(value):
            if not (
                isinstance(message, dict)
                and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)
            ):
                raise field_error(
                    row.location, f"{name}[{index}]", "a message {role: str, content: str}", message
                )
        if completion and not any(m["content"].strip() for m in value):
            raise field_error(row.location, name, "a message with non-empty content", value)
        return value
    expected = "non-empty text or a list of {role, content} messages"
    raise field_error(row.location, name, expected, value if value is not None else "null")


def align_kinds(prompt: Text, completion: Text) -> tuple[Text, Text]:
    """If either side is conversational, make both conversational."""
    if isinstance(prompt, list) and isinstance(completion, str):
        return prompt, [{"role": "assistant", "content": completion}]
    if isinstance(prompt, str) and isinstance(completion, list):
        return [{"role": "user", "content": prompt}], completion
    return prompt, completion


def split_implicit_prompt(row: Row, chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """The longest shared opening of chosen and rejected is the prompt, compared message by message for
    conversations and character by character for text, as TRL's extract_prompt does (for text, a space
    before the first difference goes with the completions)."""
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise field_error(row.location, "prompt", "a value (chosen and rejected are not of one kind)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str) and 0 < shared < min(len(chosen), len(rejected)) and chosen[shared - 1] == " ":
        shared -= 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise field_error(
            row.location,
            "prompt",
            "a value, or chosen and rejected sharing an opening (the prompt) and differing after it",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def check_unique_ids(rows: list[Row]) -> None:
    """Rows that carry an `id` must not share one: a duplicate usually means data was appended twice."""
    seen: dict[str, str] = {}
    for row in rows:
        if "id" in row.values:
            key = str(row.values["id"])
            if key in seen:
                raise field_error(row.location, "id", f"an id no other row has ({seen[key]} has it too)", key)
            seen[key] = row.location


def rater_id(row: Row, required: bool = False) -> str | None:
    """A row's rater id, text or a whole number, as text (None: the row names no rater)."""
    rater = row.values.get("rater")
    if rater is None and not required:
        return None
    if (
        rater is None
        or isinstance(rater, bool)
        or not isinstance(rater, str | int)
        or str(rater).strip() == ""
    ):
        raise field_error(row.location, "rater", "the rater's id (text or a whole number)", rater)
    return str(rater)


def parse_rows(rows: list[Row], requested: str) -> tuple[str, list]:
    """(format, parsed rows): Examples for unpaired/rated/completions/prompts, Pairs, or Rankings."""
    check_unique_ids(rows)
    kind = detect_format(rows, requested)
    if kind == "paired":
        return kind, [parse_paired(row) for row in rows]
    if kind == "ranked":
        return kind, [parse_ranked(row) for row in rows]
    return kind, [parse_example(row, kind) for row in rows]
