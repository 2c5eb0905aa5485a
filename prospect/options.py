"""Typed options: a dataclass field declared with its help text, checked when read from YAML or the command
line, with one-line errors that suggest the closest valid name. Knows nothing of what the options mean."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from prospect.errors import UserError, brief


@dataclass(frozen=True)
class Bounds:
    """The range a numeric option must lie in; open ends exclude their limit."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


POSITIVE = Bounds(0, low_open=True)
NON_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)
FRACTION = Bounds(0, 1)  # [0, 1]
SHARE = Bounds(0, 1, low_open=True)  # (0, 1]


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, bounds: Bounds | None = None) -> Any:
    """A config field with its help text, and the allowed values: `choices` for strings, `bounds` for
    numbers (every float must also be finite)."""
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds})


def coerce(
    value: Any,
    annotation: Any,
    where: str,
    choices: tuple[str, ...] | None = None,
    bounds: Bounds | None = None,
) -> Any:
    """Check `value` against a field's type and range, accepting ints for floats; raise a one-line
    UserError."""
    if isinstance(value, CommandLineText):
        if annotation is str or (value.strip() and str in typing.get_args(annotation) and value != "null"):
            value = str(value)
        else:
            try:
                value = yaml.safe_load(value) if value.strip() else None
            except yaml.YAMLError:
                value = str(value)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, where, choices, bounds)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return within(value, bounds, where, "a whole number")
        raise UserError(f"{where}: expected a whole number, got {brief(value)}")
    if annotation is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-5 as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None or not math.isfinite(number):
            raise UserError(f"{where}: expected a finite number, got {brief(value)}")
        return within(number, bounds, where, "a number")
    if annotation is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {brief(value)}")
        if choices and value not in choices:
            raise UserError(f"{where}: expected one of {', '.join(choices)}, got {brief(value)}")
        return value
    raise TypeError(f"unsupported config type {annotation}")


def within(value: float, bounds: Bounds | None, where: str, kind: str) -> Any:
    if bounds is not None and not bounds.holds(value):
        raise UserError(f"{where}: expected {kind} {bounds.describe()}, got {brief(value)}")
    return value


def build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate a config dataclass from a mapping, rejecting unknown keys with a suggestion."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UserError(f"{where}: unknown option '{key}'{suggest(key, known)}")
        meta = known[key].metadata
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}", meta.get("choices"), meta.get("bounds"))
    return cls(**kwargs)


def suggest(word: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.learning_rate=1e-5` -> (['train', 'learning_rate'], '1e-5'), typed later by the option."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected section.key=value, e.g. train.learning_rate=1e-5")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"override '{text}': expected section.key=value, e.g. loss.beta=0.2")
    return parts, CommandLineText(raw)


class CommandLineText(str):
    """An override value as typed; read as YAML unless the option is a string."""


def plain_value(value: Any) -> Any:
    """A value for a section whose options are declared elsewhere (the loss's): command-line text read as YAML."""
    if not isinstance(value, CommandLineText):
        return value
    try:
        return yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return str(value)


def describe_section(name: str, cls: type) -> list[str]:
    """`name.option = default [choices]` and its help, for each option of a section."""
    lines = []
    for f in dataclasses.fields(cls):
        choices, bounds = f.metadata.get("choices"), f.metadata.get("bounds")
        allowed = f" [{'|'.join(choices)}]" if choices else f" [{bounds.describe()}]" if bounds else ""
        lines.append(f"  {name}.{f.name} = {f.default!r}{allowed}")
        lines.append(f"      {f.metadata['help']}")
    return lines


def add_option_flags(parser: argparse.ArgumentParser, section: type) -> None:
    """One command-line flag per option of a config dataclass, `--name-with-dashes`, with its help."""
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        shown = f" [{', '.join(choices)}]" if choices else ""
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", help=f"{f.metadata['help']}{shown} (default: {f.default})"
        )


def options_from_flags(args: argparse.Namespace, section: type, where: str) -> Any:
    """The section built from the flags `add_option_flags` added, each value checked as its option is."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(section)}
    return build_section(section, {k: CommandLineText(v) for k, v in given.items() if v is not None}, where)
