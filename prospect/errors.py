"""User-facing errors: one line naming where the problem is and what was expected."""

from __future__ import annotations

import reprlib


class UserError(Exception):
    """Bad input from the user. The CLI prints the message alone, without a traceback, and exits 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when empty), or of its cause's when `datasets`
    wraps the real reason."""
    if exc.__cause__ is not None and "error occurred while generating" in str(exc):
        return first_line(exc.__cause__)
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def where(source: str, line: int | None = None, row: int | None = None) -> str:
    """Format a location as `file:line` (text files) or `file: row N` (tables, datasets)."""
    if line is not None:
        return f"{source}:{line}"
    if row is not None:
        return f"{source}: row {row}"
    return source


def field_error(location: str, field: str, expected: str, got: object = None) -> UserError:
    """`data.jsonl:12: field 'label': expected a boolean (true or false), got "yes"`."""
    message = f"{location}: field '{field}': expected {expected}"
    if got is not None:
        message += f", got {shown(got)}"
    return UserError(message)


def shown(value: object, limit: int = 60) -> str:
    """A value for an error message, cut to `limit` characters (a huge value is never printed in full)."""
    text = repr(value) if not isinstance(value, str) else '"' + value.replace("\n", "\\n") + '"'
    return text if len(text) <= limit else text[: limit - 3] + "..."


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxdict = 3, 6, 6
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def brief(value: object, limit: int = 80) -> str:
    """repr(value) for an error message, never the whole of a huge or deeply nested value (a YAML alias bomb
    expands to billions of items; reprlib stops after a few)."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
