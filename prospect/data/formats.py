"""Feedback rows in the shapes users collect, checked field by field and normalised.

- unpaired (thumbs up/down): {prompt, completion, label: bool}
- paired (comparisons): {prompt, chosen, rejected}; conversational pairs may leave the prompt implicit
  as the shared opening messages of `chosen` and `rejected`.
Text fields are strings (plain text) or lists of {role, content} messages (conversational).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Union

from prospect.data.sources import Row
from prospect.errors import UserError, field_error

Messages = list[dict[str, str]]
Text = Union[str, Messages]  # noqa: UP007 (a runtime alias)

UNPAIRED_FIELDS = ("prompt", "completion", "label")
PAIRED_FIELDS = ("prompt", "chosen", "rejected")


@dataclass
class Example:
    """One completion with an optional desirable (True) / undesirable (False) label."""

    prompt: Text
    completion: Text
    label: bool | None
    location: str


@dataclass
class Pair:
    prompt: Text
    chosen: Text
    rejected: Text
    location: str


def detect_format(rows: list[Row], requested: str) -> str:
    if requested != "auto":
        return requested
    keys = set(rows[0].values)
    if {"chosen", "rejected"} <= keys:
        return "paired"
    if {"completion", "label"} <= keys:
        return "unpaired"
    raise UserError(
        f"{rows[0].location}: cannot tell the data format from fields {sorted(keys)}; expected "
        "{prompt, completion, label} (unpaired) or {prompt, chosen, rejected} (paired)"
    )


def parse_unpaired(row: Row) -> Example:
    values = row.values
    reject_mixed(row, "completion", "chosen")
    for name in UNPAIRED_FIELDS:
        if name not in values:
            raise field_error(
                row.location, name, "a value (unpaired rows have prompt, completion, label)", None
            )
    label = values["label"]
    if not isinstance(label, bool):
        raise field_error(row.location, "label", "a boolean (true or false)", label)
    prompt = check_text(row, "prompt", values["prompt"])
    completion = check_text(row, "completion", values["completion"], completion=True)
    prompt, completion = align_kinds(prompt, completion)
    return Example(prompt, completion, label, row.location)


def parse_paired(row: Row) -> Pair:
    values = row.values
    reject_mixed(row, "chosen", "completion")
    for name in ("chosen", "rejected"):
        if name not in values:
            raise field_error(row.location, name, "a value (paired rows have prompt, chosen, rejected)", None)
    chosen = check_text(row, "chosen", values["chosen"], completion="prompt" in values)
    rejected = check_text(row, "rejected", values["rejected"], completion="prompt" in values)
    if "prompt" in values:
        prompt = check_text(row, "prompt", values["prompt"])
    else:
        prompt, chosen, rejected = split_implicit_prompt(row, chosen, rejected)
    prompt, chosen = align_kinds(prompt, chosen)
    _, rejected = align_kinds(prompt, rejected)
    return Pair(prompt, chosen, rejected, row.location)


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


def split_implicit_prompt(row: Row, chosen: Text, rejected: Text) -> tuple[Messages, Messages, Messages]:
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise field_error(
            row.location, "prompt", "a value (only conversational pairs may leave it implicit)", None
        )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise field_error(
            row.location,
            "prompt",
            "a value, or chosen/rejected sharing their opening messages and differing after",
            None,
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def pairs_to_unpaired(pairs: list[Pair], seed: int) -> list[Example]:
    """Each pair gives one desirable and one undesirable example, shuffled so batches mix labels."""
    examples = []
    for pair in pairs:
        examples.append(Example(pair.prompt, pair.chosen, True, pair.location))
        examples.append(Example(pair.prompt, pair.rejected, False, pair.location))
    random.Random(seed).shuffle(examples)
    return examples


def parse_rows(rows: list[Row], requested: str) -> tuple[str, list[Example] | list[Pair]]:
    kind = detect_format(rows, requested)
    parse = parse_unpaired if kind == "unpaired" else parse_paired
    return kind, [parse(row) for row in rows]
