"""Progress of a long phase (model conversion, reference log-probs, held-out sampling, an online round's
generation): a bar with its ETA on a terminal, and a line every few percent, with the elapsed time and the
ETA, where the output is a log file. One helper, so every phase reports the same way."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable, Iterator
from types import ModuleType, TracebackType
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def duration(seconds: float) -> str:
    """`42s`, `3m05s` or `1h07m`."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """`total` units of work named `desc`. `update` may take fractions (a sampler reports each generated
    token as a share of its batch); the bar shows whole units. Without a terminal on stderr, a line goes to
    stdout each time another `percent` percent is done, at most one every `interval` seconds, and a last one
    at the end if any was printed: a phase of a few seconds prints nothing (`percent=0`: no lines, for a
    phase that prints its own). Nothing is shown unless `show` (the main process)."""

    interval = 10.0

    def __init__(
        self,
        desc: str,
        total: float,
        unit: str = "it",
        show: bool = True,
        percent: float = 5.0,
        initial: int = 0,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.done = self.first = float(initial)
        self.started = time.perf_counter()
        terminal = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=f" {unit}",
            dynamic_ncols=True,
            disable=not (show and terminal),
        )
        self.percent = percent if show and not terminal else 0.0
        self.next_line = self.percent
        self.last_line: float | None = None  # when the last line was printed

    def update(self, n: float = 1) -> None:
        self.done = min(self.done + n, self.total)
        shown = int(self.done) - self.bar.n
        if shown > 0:
            self.bar.update(shown)
        share = 100 * self.done / self.total if self.total > 0 else 100.0
        if not self.percent or share < self.next_line - 1e-9:
            return
        self.next_line = (share // self.percent + 1) * self.percent
        now = time.perf_counter()
        if now - (self.last_line or self.started) >= self.interval or (share >= 100 and self.last_line):
            print(self.status(), flush=True)
            self.last_line = now

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        for item in items:
            yield item
            self.update()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def eta(self) -> float | None:
        """Seconds left at the rate so far, or None before any progress."""
        made = self.done - self.first
        return self.elapsed / made * (self.total - self.done) if made > 0 else None

    def status(self) -> str:
        eta = self.eta()
        share = 100 * self.done / self.total if self.total else 100.0
        return (
            f"{self.desc}: {int(self.done)}/{self.total:.0f} {self.unit} ({share:.0f}%), "
            f"{duration(self.elapsed)} elapsed, eta {'?' if eta is None else duration(eta)}"
        )

    def write(self, line: str) -> None:
        """A line above the bar, without breaking it."""
        if self.bar.disable:
            print(line, flush=True)
        else:
            self.bar.write(line)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def reporting(module: ModuleType, desc: str, unit: str, show: bool = True) -> Iterator[None]:
    """While inside, the loops a library module runs through its own `tqdm` (transformers' GGUF
    de-quantization) report through Progress instead. A module without one is left alone."""
    original = getattr(module, "tqdm", None)
    if original is None:
        yield
        return

    def tracked(items: Iterable[T], *args: Any, **kwargs: Any) -> Iterator[T]:
        items = list(items)
        with Progress(desc, len(items), unit, show=show) as progress:
            yield from progress.iterate(items)

    setattr(module, "tqdm", tracked)  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "tqdm", original)  # noqa: B010
