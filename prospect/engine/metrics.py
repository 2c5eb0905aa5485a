"""Step metrics: accumulated over microbatches, reduced across processes in one collective, then
written to metrics.jsonl, the console and accelerate's trackers."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from prospect.io import write_text_atomic

log = logging.getLogger(__name__)


class StepStats:
    """Sums and counts for one optimizer step. Every process must add the same keys, so that the single
    all-reduce in `reduce` lines up (a metric for an empty group is (0, 0), never skipped)."""

    def __init__(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = defaultdict(float)
        self.counts: dict[str, float | torch.Tensor] = defaultdict(float)
        self.totals: dict[str, float | torch.Tensor] = defaultdict(float)

    def add_mean(self, name: str, total: torch.Tensor | float, count: torch.Tensor | float) -> None:
        self.sums[name] = self.sums[name] + total
        self.counts[name] = self.counts[name] + count

    def add_total(self, name: str, value: torch.Tensor | float) -> None:
        self.totals[name] = self.totals[name] + value

    def reduce(self, reduce_sum) -> dict[str, float]:
        keys = sorted(self.sums)
        totals = sorted(self.totals)
        flat = torch.tensor(
            [float(self.sums[k]) for k in keys]
            + [float(self.counts[k]) for k in keys]
            + [float(self.totals[k]) for k in totals],
            dtype=torch.float64,
        )
        flat = reduce_sum(flat).tolist()
        n = len(keys)
        out = {k: (flat[i] / flat[n + i] if flat[n + i] else math.nan) for i, k in enumerate(keys)}
        out.update({k: flat[2 * n + i] for i, k in enumerate(totals)})
        return out


class MetricsLog:
    """Appends one JSON line per step to metrics.jsonl; on resume, cut back to the resumed step. A line a kill
    cut short (only the last can be) is dropped with a warning."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            kept = []
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    log.warning("%s:%d: not a whole JSON line (a kill cut it short); dropped", path, number)
                    continue
                if isinstance(record, dict) and record.get("step", math.inf) <= resume_step:
                    kept.append(line)
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record, allow_nan=True) + "\n")


SHORT = {
    "loss": "loss",
    "kl": "kl",
    "kl_estimate_raw": "kl_raw",
    "reference_point": "ref_point",
    "rewards/desirable": "r_D",
    "rewards/undesirable": "r_U",
    "count/desirable": "n_D",
    "count/undesirable": "n_U",
    "grad_norm": "gnorm",
    "lr": "lr",
    "tokens_per_s": "tok/s",
}


def format_line(step: int, total: int, metrics: dict[str, float]) -> str:
    parts = [f"step {step}/{total}"]
    for key, value in metrics.items():
        label = SHORT.get(key, key)
        if key == "lr":
            parts.append(f"{label} {value:.2e}")
        elif key.startswith("count/") or key == "tokens_per_s":
            parts.append(f"{label} {value:.0f}")
        else:
            parts.append(f"{label} {value:.4f}")
    return " | ".join(parts)
