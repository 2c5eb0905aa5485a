"""User-facing errors: one line naming where the problem is and what was expected."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user. The CLI prints the message alone, without a traceback, and exits 2."""


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
        message += f", got {_show(got)}"
    return UserError(message)


def _show(value: object, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, str) else '"' + value.replace("\n", "\\n") + '"'
    return text if len(text) <= limit else text[: limit - 3] + "..."
