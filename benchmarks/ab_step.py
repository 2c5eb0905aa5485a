"""One lever's two settings, alternated step by step inside one prospect run, on trl_compare.py's jobs.

    python benchmarks/ab_step.py --lever kernel --job kto --max-length 128 --steps 13
    python benchmarks/ab_step.py --lever fill --job kto --task arithmetic

Levers: `kernel` (segment attention as one masked SDPA call per layer, or eager attention under the same
mask), `fill` (deterministic mode's NaN fill of new tensors, off or on). Steps alternate between the two
settings, so load from other work slows both alike; the first two steps are warm-up. Each setting's mean
step time and its standard error are printed, with the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import trl_compare

from prospect.models import attention


def set_kernel(value: str) -> None:
    attention.SEGMENT_KERNEL = value


def set_fill(value: str) -> None:
    torch.utils.deterministic.fill_uninitialized_memory = value == "on"  # type: ignore[attr-defined]


LEVERS = {"kernel": (set_kernel, ("eager", "sdpa")), "fill": (set_fill, ("off", "on"))}


class AlternatingTimer(trl_compare.Timer):
    lever = "kernel"
    current: AlternatingTimer | None = None

    def __init__(self):
        super().__init__()
        AlternatingTimer.current = self

    def begin(self):
        setter, values = LEVERS[self.lever]
        setter(values[len(self.times) % 2])
        super().begin()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lever", choices=sorted(LEVERS), default="kernel")
    parser.add_argument("--job", choices=["kto", "dpo"], default="kto")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--options", default="packed+cached", help="prospect options, as in trl_compare.py")
    trl_compare.add_task_argument(parser)
    args = parser.parse_args()
    AlternatingTimer.lever = args.lever
    trl_compare.Timer = AlternatingTimer  # type: ignore[misc]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        rows = trl_compare.BATCH * (args.steps + 2)
        trl_compare.write_job_data(args.task, args.job, args.max_length, rows, data)
        options = set(args.options.split("+")) if args.options else set()
        trl_compare.run_prospect(args.job, data, args.max_length, args.steps, Path(tmp) / "out", options)
    timer = AlternatingTimer.current
    if timer is None:
        raise SystemExit("no step ran")
    values = LEVERS[args.lever][1]
    print(f"\n{args.lever} on {args.job.upper()} {args.task} {args.max_length}, prospect+{args.options}:")
    means = {}
    for parity, value in enumerate(values):
        times = [t for i, t in enumerate(timer.times) if i >= 2 and i % 2 == parity]
        means[value] = statistics.fmean(times)
        error = statistics.stdev(times) / len(times) ** 0.5 if len(times) > 1 else float("nan")
        print(f"  {value:>6}: {means[value]:.3f} s/step ± {error:.3f} ({len(times)} steps)")
    print(f"  {values[1]} / {values[0]}: x{means[values[1]] / means[values[0]]:.2f}")


if __name__ == "__main__":
    main()
