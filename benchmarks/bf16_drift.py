"""How far the implied reward log pi/pi_ref drifts between bf16 autocast and fp32 training (issue 15).

Two runs of the same KTO job from the same weights, data order and seed, one in fp32 and one under bf16
autocast, each measured at steps 1, 10 and 100 on a fixed probe set of training sequences: the mean log-ratio
log pi(y|x) - log pi_ref(y|x) in each precision and the mean absolute gap between them, in nats per sequence.
The log-ratios are those the loss sees (bf16 run: bf16 policy and reference; fp32 run: fp32).

    python benchmarks/bf16_drift.py --model smollm2 --lrs 5e-7,1e-6,5e-6,1e-5 --steps 1,10,100
    python benchmarks/bf16_drift.py --model tiny-q4:128:4 [--unrounded] --lrs 5e-7,1e-5 --steps 1,10,100

The job: 256 KTO rows from the built-in arithmetic task (prompt rendered with the chat template, completion
"Answer: N", desirable when N is right, a wrong N otherwise), batch 8, beta 0.1, constant learning rate,
no warm-up, one process. `--model tiny-q4` is a small Llama whose linear weights are de-quantized from a
Q4_1 code (blocks of 32, fp16 scale and minimum, 4-bit levels), as GGUF files hold them, then stored as
their bf16 values as prospect's GGUF conversion does (`--unrounded` skips that, to see the problem). For
SmolLM2 before the fix, pass the directory of a conversion made without rounding as `--model`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prospect.data import tasks
from prospect.data.batching import pad
from prospect.engine.trainer import StepResult, Trainer
from prospect.models.precision import round_to_bf16
from prospect.recipe import load_config
from tests.helpers import build_tokenizer, dequantized_model


def arithmetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for question, answer, _ in tasks.problems("arithmetic", (1,))[:n]:
        right = rng.random() < 0.5
        shown = answer if right else answer + rng.choice([-3, -2, -1, 1, 2, 3])
        prompt = [{"role": "user", "content": f"{tasks.INSTRUCTION}\n{question} ="}]
        rows.append(
            {
                "prompt": prompt,
                "completion": [{"role": "assistant", "content": f"Answer: {shown}"}],
                "label": right,
            }
        )
    return rows


def tiny_model(directory: Path, hidden: int, layers: int, rounded: bool) -> Path:
    tokenizer = build_tokenizer()
    model = dequantized_model(len(tokenizer), hidden, layers)
    if rounded:
        round_to_bf16(model)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run(
    model: str, data: Path, out: Path, precision: str, lr: float, steps: list[int], probe_rows: int
) -> dict:
    overrides = [
        f"model.name={model}",
        f"data.train={data}",
        "data.max_length=96",
        "data.max_prompt_length=80",
        f"train.output_dir={out}",
        "train.batch_size=8",
        f"train.max_steps={max(steps)}",
        f"train.learning_rate={lr}",
        "train.warmup_ratio=0",
        "train.lr_scheduler=constant",
        f"train.precision={precision}",
        "train.log_every=1000",
        "train.save_every=0",
        "loss.name=kto",
        "loss.beta=0.1",
    ]
    trainer = Trainer(load_config(None, overrides))
    items = trainer.data.items[:probe_rows]
    probe = pad(
        [it.prompt_ids for it in items], [it.completion_ids for it in items], trainer.tokenizer.pad_token_id
    )
    found: dict[int, list[float]] = {}

    def measure(t: Trainer, result: StepResult) -> None:
        if result.step in steps:
            with torch.no_grad():
                policy = probe.per_sequence(t.policy_token_logps(probe))
                found[result.step] = (policy - t.live_reference(probe)).tolist()

    trainer.callbacks.append(measure)
    started = time.perf_counter()
    trainer.train()
    return {"ratios": found, "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="smollm2", help="smollm2, tiny-q4[:hidden:layers], or a model path"
    )
    parser.add_argument(
        "--unrounded", action="store_true", help="tiny-q4: keep the de-quantized weights (no round_to_bf16)"
    )
    parser.add_argument("--lrs", default="5e-7,1e-5")
    parser.add_argument("--steps", default="1,10,100")
    parser.add_argument("--probe", type=int, default=32, help="training sequences measured")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model.startswith("tiny-q4"):  # tiny-q4[:hidden:layers]
            hidden, layers = ([int(x) for x in args.model.split(":")[1:]] or [128, 4])[:2]
            model = str(tiny_model(root / "tiny-q4", hidden, layers, rounded=not args.unrounded))
        else:
            model = args.model
        data = root / "arithmetic.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(256)))
        table = []
        for lr in (float(x) for x in args.lrs.split(",")):
            runs = {
                p: run(model, data, root / f"{p}-{lr}", p, lr, steps, args.probe) for p in ("fp32", "bf16")
            }
            for step in steps:
                fp32, bf16 = runs["fp32"]["ratios"][step], runs["bf16"]["ratios"][step]
                gap = statistics.fmean(abs(a - b) for a, b in zip(fp32, bf16))
                row = {
                    "lr": lr,
                    "step": step,
                    "fp32_ratio": statistics.fmean(fp32),
                    "bf16_ratio": statistics.fmean(bf16),
                    "mean_abs_gap": gap,
                    "max_abs_gap": max(abs(a - b) for a, b in zip(fp32, bf16)),
                }
                table.append(row)
                print(
                    f"lr {lr:g} step {step:>3}: log-ratio fp32 {row['fp32_ratio']:+.4f} bf16 {row['bf16_ratio']:+.4f} "
                    f"| gap mean {gap:.4f} max {row['max_abs_gap']:.4f} nats",
                    flush=True,
                )
            print(
                f"  wall: fp32 {runs['fp32']['seconds']:.0f}s, bf16 {runs['bf16']['seconds']:.0f}s",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
