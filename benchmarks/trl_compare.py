"""prospect against TRL on the same KTO or DPO job, side by side, in one invocation.

    pip install -e .[bench]          # TRL and psutil, optional benchmark dependencies
    python benchmarks/trl_compare.py --job kto --max-length 128
    python benchmarks/trl_compare.py --job dpo --max-length 512 --steps 6

Each library runs in its own subprocess (so peak memory is its own) on SmolLM2-135M-Instruct, per-device
batch 8, the same data and hyperparameters, each in its fastest configuration that works on this CPU
(bf16 autocast; eager attention in TRL, prospect's segment attention, which is eager attention under a
mask that can also share prompts). Reported per library:
- tokens/s: non-pad tokens of the trained sequences (prompt + completion; chosen and rejected for DPO)
  per second of step time, the first (warm-up) step excluded; samples/s likewise (examples or pairs);
- peak RSS of the process;
- useful GFLOP/s: the model FLOPs the algorithm needs at non-pad tokens (policy forward and backward,
  reference forward, and for KTO the policy and reference forwards of the KL batch), as a fraction of this
  machine's bf16 and fp32 matmul peaks, measured in the same run; 'run % bf16' counts only the tokens the
  network ran (a prompt shared by chosen and rejected once);
- the loss of the first step (policy = reference, so KTO = 0.5 lambda and DPO = ln 2 in both).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LR, BETA, BATCH = 1e-6, 0.1, 8


def matmul_peak(dtype: torch.dtype, size: int = 2048, reps: int = 6, trials: int = 5) -> float:
    """The best of `trials` timings of `reps` square matmuls: the clock of a shared CPU varies."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * size**3 * reps / (time.perf_counter() - started) / 1e9)
    return best


def build_data(job: str, max_length: int, rows: int, path: Path) -> None:
    """VADER movie snippets as completions: 1-3 per completion for 128-token jobs, 3-16 for 512, so lengths
    vary the way real feedback does."""
    from prospect.data.vader import load_ratings, review_prompt

    items = load_ratings()
    rng = random.Random(0)
    many = (1, 3) if max_length <= 128 else (3, 16)

    def completion() -> str:
        return " ".join(rng.choice(items).text for _ in range(rng.randint(*many)))

    with open(path, "w") as handle:
        for i in range(rows):
            prompt = [{"role": "user", "content": review_prompt(rng.choice(items).text)}]
            if job == "kto":
                row = {
                    "prompt": prompt,
                    "completion": [{"role": "assistant", "content": completion()}],
                    "label": i % 2 == 0,
                }
            else:
                row = {
                    "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": completion()}],
                    "rejected": [{"role": "assistant", "content": completion()}],
                }
            handle.write(json.dumps(row) + "\n")


def model_dir() -> str:
    from prospect.config import ModelConfig
    from prospect.models.loading import local_source

    return local_source(ModelConfig(name="smollm2"))


class Timer:
    """Step wall times and trained tokens, recorded by both libraries' hooks."""

    def __init__(self):
        self.times, self.tokens, self.samples, self.losses = [], [], [], []
        self.computed = []  # tokens the network actually ran: a shared prompt counts once
        self.started = None
        self.setup_seconds = 0.0  # reference log-probs computed before training (cached runs)

    def begin(self):
        self.started = time.perf_counter()

    def end(self):
        self.times.append(time.perf_counter() - self.started)

    def summary(self) -> dict:
        times, tokens, samples = self.times[1:], self.tokens[1:], self.samples[1:]
        return {
            "tokens_per_s": sum(tokens) / sum(times),
            "samples_per_s": sum(samples) / sum(times),
            "step_seconds": sum(times) / len(times),
            "tokens_per_step": sum(tokens) / len(tokens),
            "computed_fraction": sum(self.computed[1:]) / sum(tokens) if self.computed else 1.0,
            "setup_seconds": self.setup_seconds,
            "first_loss": self.losses[0] if self.losses else None,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def run_prospect(job: str, data: Path, max_length: int, steps: int, out: Path, options: set[str]) -> dict:
    """options: 'packed' (padding-free rows; chosen and rejected share their prompt), 'lean' (gradient
    checkpointing), 'cached' (reference log-probs computed once before training; their time is reported
    apart), 'eager' or 'sdpa' (transformers' attention instead of prospect's: no shared prompts)."""
    from prospect.config import load_config
    from prospect.engine.trainer import Trainer

    timer = Timer()
    overrides = [
        f"loss.name={job}",
        f"loss.beta={BETA}",
        f"data.train={data}",
        f"data.max_length={max_length}",
        f"data.max_prompt_length={max_length // 2}",
        f"train.output_dir={out}",
        f"train.batch_size={BATCH}",
        f"train.max_steps={steps}",
        f"train.learning_rate={LR}",
        "train.warmup_ratio=0",
        "train.log_every=1000",
        "train.precision=bf16",
        f"train.padding_free={'packed' in options}",
        f"model.gradient_checkpointing={'lean' in options}",
        f"train.reference_cache={'cached' in options}",
        f"model.attn_implementation={next((a for a in ('sdpa', 'eager') if a in options), 'auto')}",
    ]
    if job == "kto":
        overrides.append("loss.desirable_weight=1.0")
    if "cached" in options:  # a fresh cache, so the reference really runs; its time is reported apart
        from prospect.engine import trainer as engine

        engine.ReferenceCache = functools.partial(engine.ReferenceCache, directory=out.parent / "reference")
    trainer = Trainer(load_config(None, overrides))
    original = trainer.train_step
    original_precompute = trainer.precompute_reference

    def timed_precompute():
        started = time.perf_counter()
        original_precompute()
        timer.setup_seconds = time.perf_counter() - started

    trainer.precompute_reference = timed_precompute

    def timed_step():
        timer.begin()
        metrics = original()
        timer.end()
        timer.losses.append(metrics["loss"])
        return metrics

    original_accumulate = trainer.accumulate_gradients

    def counting():
        metrics, batches = original_accumulate()
        timer.tokens.append(sum(b.sequences.tokens for b in batches))
        timer.computed.append(sum(int((b.sequences.sequence_index >= 0).sum()) for b in batches))
        timer.samples.append(sum(b.units for b in batches))
        return metrics, batches

    trainer.accumulate_gradients = counting
    trainer.train_step = timed_step
    trainer.train()
    return timer.summary()


def run_trl(job: str, data: Path, max_length: int, steps: int, out: Path, precompute: bool) -> dict:
    """precompute: TRL's own precompute_ref_log_probs (reference log-probs before the first step)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    timer = Timer()
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    reference = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    dataset = load_dataset("json", data_files=str(data), split="train")
    common = {
        "output_dir": str(out),
        "per_device_train_batch_size": BATCH,
        "max_steps": steps,
        "learning_rate": LR,
        "beta": BETA,
        "bf16": True,
        "use_cpu": True,
        "report_to": [],
        "logging_steps": 1,
        "save_strategy": "no",
        "max_length": max_length,
        "warmup_steps": 0,
        "dataloader_num_workers": 0,
        "precompute_ref_log_probs": precompute,
    }
    timer.begin()  # setup: the trainer's construction up to its first step (TRL may precompute in either)
    if job == "kto":
        from trl import KTOConfig, KTOTrainer

        trainer = KTOTrainer(
            model=model,
            ref_model=reference,
            args=KTOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(
            model=model,
            ref_model=reference,
            args=DPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
        )

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not timer.times:  # before the first step: TRL's reference precompute, if any
                timer.setup_seconds = time.perf_counter() - timer.started
            timer.begin()

        def on_step_end(self, args, state, control, **kwargs):
            timer.end()

    original = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        timer.tokens.append(int(inputs["attention_mask"].sum()))
        timer.samples.append(int(inputs["input_ids"].shape[0] // (2 if job == "dpo" else 1)))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    trainer.add_callback(Clock())
    trainer.train()
    timer.losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return timer.summary()


def useful_flops_per_token(job: str, tokens_per_sequence: float, reference_in_step: bool = True) -> float:
    """Model FLOPs per trained token in a step: 6N for the policy's forward and backward, 2N per further
    forward (the reference, unless precomputed; for KTO also the policy and reference on the KL batch), plus
    attention scores."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir())
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = d // heads
    per_layer = (
        d * heads * head_dim + 2 * d * kv * head_dim + heads * head_dim * d + 3 * d * config.intermediate_size
    )
    matmul_params = layers * per_layer + d * vocab
    attention = 4 * layers * d * tokens_per_sequence / 2  # QK^T and AV, causal: half the square
    per_forward = 2 * matmul_params + attention
    forwards = (1 + (1 if job == "kto" else 0)) * reference_in_step + (1 if job == "kto" else 0)
    return 3 * per_forward + forwards * per_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["kto", "dpo"], default="kto")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--libraries",
        default="prospect,trl",
        help="comma separated: trl, trl+precompute (reference precomputed), or prospect with options joined by '+': packed (padding-free rows), "
        "lean (gradient checkpointing), cached (reference log-probs precomputed), eager or sdpa "
        "(transformers' attention instead of prospect's), e.g. prospect+packed+lean",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out"
            if args.worker in ("trl", "trl+precompute"):
                precompute = args.worker == "trl+precompute"
                result = run_trl(args.job, Path(args.data), args.max_length, args.steps, out, precompute)
            else:
                name, *options = args.worker.split("+")
                if name != "prospect" or not set(options) <= {"packed", "lean", "cached", "sdpa", "eager"}:
                    parser.error(f"unknown library {args.worker!r}")
                result = run_prospect(
                    args.job, Path(args.data), args.max_length, args.steps, out, set(options)
                )
        print("RESULT " + json.dumps(result), flush=True)
        return
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        build_data(args.job, args.max_length, BATCH * (args.steps + 2) * 2, data)
        results = {}
        for library in args.libraries.split(","):
            command = [
                sys.executable,
                __file__,
                "--worker",
                library,
                "--job",
                args.job,
                "--data",
                str(data),
                "--max-length",
                str(args.max_length),
                "--steps",
                str(args.steps),
            ]
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{library} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            results[library] = json.loads(lines[-1][len("RESULT ") :])
    print(
        f"\n{args.job.upper()}, SmolLM2-135M, batch {BATCH}, max length {args.max_length}, {args.steps} steps "
        f"(first excluded); matmul peaks: bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s, "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        f"{'library':>22} {'tokens/s':>9} {'samples/s':>9} {'s/step':>7} {'peak RSS MB':>11} {'GFLOP/s':>8} "
        f"{'% bf16':>7} {'% fp32':>7} {'run % bf16':>10} {'step-1 loss':>11} {'setup s':>7}"
    )
    print(header)
    for library, r in results.items():
        tokens_per_sequence = r["tokens_per_step"] / (BATCH * (2 if args.job == "dpo" else 1))
        precomputed = "cached" in library or "precompute" in library
        flops = useful_flops_per_token(args.job, tokens_per_sequence, reference_in_step=not precomputed)
        gflops = r["tokens_per_s"] * flops / 1e9
        setup = f"{r['setup_seconds']:.0f}" if precomputed else "-"
        print(
            f"{library:>22} {r['tokens_per_s']:>9.0f} {r['samples_per_s']:>9.2f} {r['step_seconds']:>7.2f} "
            f"{r['peak_rss_mb']:>11.0f} {gflops:>8.1f} {100 * gflops / peaks['bf16']:>6.1f}% "
            f"{100 * gflops / peaks['fp32']:>6.1f}% {100 * gflops * r['computed_fraction'] / peaks['bf16']:>9.1f}% "
            f"{r['first_loss'] if r['first_loss'] is not None else float('nan'):>11.4f}"
            f" {setup:>7}"
        )
    for name in results:
        peer = "trl+precompute" if "cached" in name else "trl"
        if name.startswith("prospect") and peer in results:
            p, t = results[name], results[peer]
            print(
                f"{name} / {peer}: tokens/s x{p['tokens_per_s'] / t['tokens_per_s']:.2f}, "
                f"peak RSS x{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}"
            )


if __name__ == "__main__":
    main()
