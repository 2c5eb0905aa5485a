"""Where each sequence sits in a batch's rows, and what it may attend to.

A row holds spans laid end to end. A span attends causally to itself and, if it is a branch, to a prefix
of an earlier span of the same row (the shared prompt). Padded rows have one span per sequence and one
for the pad tail; packed rows one per sequence. models/attention.py turns a layout into attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Span:
    """Tokens [start, start + length) of a row; they also see [prefix_start, prefix_start + prefix_length)."""

    start: int
    length: int
    prefix_start: int = 0
    prefix_length: int = 0


@dataclass(frozen=True)
class SegmentLayout:
    """Spans per row, tiling each row from position 0 in order."""

    rows: tuple[tuple[Span, ...], ...]
    masks: dict = field(default_factory=dict, compare=False, repr=False)

    def allowed_mask(self, width: int, device: torch.device) -> torch.Tensor:
        """[rows, 1, width, width] bool: True where a token may attend."""
        key = ("allowed", width, device)
        if key not in self.masks:
            allowed = torch.zeros(len(self.rows), width, width, dtype=torch.bool, device=device)
            for r, spans in enumerate(self.rows):
                for s in spans:
                    end = s.start + s.length
                    allowed[r, s.start : end, s.start : end] = torch.ones(
                        s.length, s.length, dtype=torch.bool
                    ).tril()
                    if s.prefix_length:
                        allowed[r, s.start : end, s.prefix_start : s.prefix_start + s.prefix_length] = True
            self.masks[key] = allowed.unsqueeze(1)
        return self.masks[key]

    def additive_mask(self, width: int, device: torch.device) -> torch.Tensor:
        """[rows, 1, width, width] fp32: 0 where a token may attend, the fp32 minimum elsewhere."""
        key = ("additive", width, device)
        if key not in self.masks:
            allowed = self.allowed_mask(width, device)
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=device)
            self.masks[key] = mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
        return self.masks[key]

    @property
    def shares_prompts(self) -> bool:
        return any(s.prefix_length for spans in self.rows for s in spans)

    @classmethod
    def padded(cls, lengths: list[int], width: int) -> SegmentLayout:
        """Right-padded rows: the sequence, then its pad tail as a span of its own."""
        rows = []
        for n in lengths:
            rows.append((Span(0, n),) + ((Span(n, width - n),) if n < width else ()))
        return cls(tuple(rows))
