"""One row of user data and where it came from, so every later error can name the file and line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Row:
    location: str
    values: dict[str, Any]
