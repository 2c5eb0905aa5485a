"""Where one training step's time goes, by operator class, for prospect or TRL on trl_compare.py's jobs.

    python benchmarks/profile_step.py --job kto --max-length 128 --library prospect+packed+cached
    python benchmarks/profile_step.py --job kto --max-length 128 --library trl+nockpt+precompute

The second step is profiled (the first is warm-up) with torch.profiler; each operator's self CPU time is
put in one class: the projection and MLP matmuls, the output projection (a matmul with the vocabulary as one
side), attention (batched matmuls and scaled-dot-product kernels), softmax and log-softmax, the optimizer,
masks and indexing, dtype casts and copies, the other element-wise work (norms, activations, residuals),
and the rest. Forward and backward kernels fall in the same class.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import trl_compare

MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_flash_attention_forward"}
SOFTMAX = {
    "aten::_softmax",
    "aten::_log_softmax",
    "aten::_softmax_backward_data",
    "aten::_log_softmax_backward_data",
}
CASTS = {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::empty_strided"}
MASKS = {
    "aten::where", "aten::triu", "aten::tril", "aten::eq", "aten::ne", "aten::lt", "aten::le", "aten::gt",
    "aten::ge", "aten::cumsum", "aten::arange", "aten::index", "aten::index_put_", "aten::masked_fill_",
    "aten::masked_scatter_", "aten::masked_select", "aten::nonzero", "aten::gather", "aten::scatter_",
    "aten::logical_and", "aten::logical_or", "aten::logical_not", "aten::bitwise_and", "aten::bitwise_or",
    "aten::bitwise_not", "aten::embedding_dense_backward", "aten::index_select", "aten::embedding",
}  # fmt: skip


def operator_class(name: str, shapes: list, vocab: int) -> str:
    if name in MATMULS:
        if name in ("aten::bmm", "aten::baddbmm"):
            return "attention"
        return "output projection" if any(vocab in s for s in shapes if s) else "projections and MLP"
    if name in ATTENTION or "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in SOFTMAX:
        return "softmax and log-softmax"
    if "adam" in name.lower() or "_foreach" in name:
        return "optimizer"
    if name in MASKS:
        return "masks and indexing"
    if name in CASTS:
        return "casts and copies"
    if name.startswith("aten::"):
        return "element-wise (norms, activations, residuals)"
    return "other"


class ProfiledTimer(trl_compare.Timer):
    """trl_compare's step timer, which both libraries' hooks call: the second step runs under the profiler."""

    current: ProfiledTimer | None = None

    def __init__(self):
        super().__init__()
        self.profiler: profile | None = None
        self.done: profile | None = None
        ProfiledTimer.current = self

    def begin(self):
        if len(self.times) == 1 and self.done is None and self.profiler is None:
            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.profiler.start()
        super().begin()

    def end(self):
        super().end()
        if self.profiler is not None:
            self.profiler.stop()
            self.done, self.profiler = self.profiler, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["kto", "dpo"], default="kto")
    parser.add_argument("--max-length", type=int, default=128)
    trl_compare.add_task_argument(parser)
    parser.add_argument("--library", default="prospect+packed+cached")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--top", type=int, default=0, help="also list the operators that took most time")
    args = parser.parse_args()
    trl_compare.Timer = ProfiledTimer  # type: ignore[misc]
    name, *options = args.library.split("+")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        trl_compare.write_job_data(args.task, args.job, args.max_length, trl_compare.BATCH * 8, data)
        run = trl_compare.run_trl if name == "trl" else trl_compare.run_prospect
        run(args.job, data, args.max_length, 3, Path(tmp) / "out", set(options))
    timer = ProfiledTimer.current
    if timer is None or timer.done is None:
        raise SystemExit("no step was profiled")
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(trl_compare.model_dir()).vocab_size
    seconds: dict[str, float] = defaultdict(float)
    for event in timer.done.key_averages(group_by_input_shape=True):
        seconds[operator_class(event.key, event.input_shapes, vocab)] += event.self_cpu_time_total / 1e6
    step = timer.times[1]
    seconds["outside operators (Python, framework)"] = max(0.0, step - sum(seconds.values()))
    total = sum(seconds.values())
    print(
        f"\n{args.library}, {args.job.upper()} {args.task} {args.max_length}: step {step:.2f} s under the profiler"
    )
    for key, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {key:>46} {value:>7.2f} s {100 * value / total:>5.1f}%")
    events = sorted(timer.done.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for event in events[: args.top]:
        print(f"  {event.key:>46} {event.self_cpu_time_total / 1e6:>7.2f} s {event.count:>6} calls")
    if args.json:
        Path(args.json).write_text(json.dumps({"step_seconds": step, "classes": seconds}, indent=1))


if __name__ == "__main__":
    main()
