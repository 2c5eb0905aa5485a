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
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import (
    ALLOCATORS,
    KNOWN_BF16_PEAK,
    allocator_env,
    cpu_kind,
    matmul_peak,
    shape_roofline,
    wait_until_quiet,
)

LR, BETA, BATCH = 1e-6, 0.1, 8


def build_arithmetic(job: str, rows: int, path: Path) -> None:
    """The short job: arithmetic prompts from prospect's built-in task (about 70 tokens with the chat template)
    and worked answers; for KTO a right answer is desirable and a wrong one not, for DPO right is chosen."""
    from prospect.data.tasks import rows as task_rows

    rng = random.Random(0)
    problems = task_rows("arithmetic", [1, 2, 3], "train")
    rng.shuffle(problems)

    def answer(row: dict, right: bool) -> list[dict]:
        value = int(row["answer"]) + (0 if right else rng.choice([-10, -2, -1, 1, 2, 10]))
        question = row["prompt"][0]["content"].splitlines()[-1].rstrip(" =")
        return [{"role": "assistant", "content": f"{question} = {value}. Answer: {value}"}]

    with open(path, "w") as handle:
        for i, problem in enumerate(problems[:rows]):
            row, right = problem.values, i % 2 == 0
            if job == "kto":
                out = {"prompt": row["prompt"], "completion": answer(row, right), "label": right}
            else:
                out = {"prompt": row["prompt"], "chosen": answer(row, True), "rejected": answer(row, False)}
            handle.write(json.dumps(out) + "\n")


def write_job_data(task: str, job: str, max_length: int, rows: int, path: Path) -> None:
    if task == "arithmetic":
        build_arithmetic(job, rows, path)
    else:
        build_data(job, max_length, rows, path)


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


def add_task_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--task",
        choices=["vader", "arithmetic"],
        default="vader",
        help="vader: movie snippets as completions (lengths set by --max-length); arithmetic: the short job, "
        "worked answers to the built-in arithmetic task, about 70 tokens",
    )


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


PROSPECT_OPTIONS = {"packed", "lean", "cached", "sdpa", "eager"}


def run_prospect(job: str, data: Path, max_length: int, steps: int, out: Path, options: set[str]) -> dict:
    """options: 'packed' (padding-free rows; chosen and rejected share their prompt), 'lean' (gradient
    checkpointing), 'cached' (reference log-probs computed once before training; their time is reported
    apart), 'eager' or 'sdpa' (transformers' attention instead of prospect's: no shared prompts)."""
    from prospect.engine.trainer import Trainer
    from prospect.recipe import load_config

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
    return {
        **timer.summary(),
        "settings": dict(
            o.split("=", 1) for o in overrides if not o.startswith(("data.train", "train.output_dir"))
        ),
    }


TRL_OPTIONS = {"nockpt", "precompute", "sdpa", "eager"}


def run_trl(job: str, data: Path, max_length: int, steps: int, out: Path, options: set[str]) -> dict:
    """options: 'nockpt' (gradient checkpointing off; TRL's KTOConfig/DPOConfig turn it on by default),
    'precompute' (TRL's precompute_ref_log_probs: reference log-probs before the first step), 'sdpa' or
    'eager' (the attention; otherwise transformers' default for the model)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    timer = Timer()
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    chosen = [a for a in ("sdpa", "eager") if a in options]
    attention = {"attn_implementation": chosen[0]} if chosen else {}
    model = AutoModelForCausalLM.from_pretrained(path, **attention)
    reference = AutoModelForCausalLM.from_pretrained(path, **attention)
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
        "precompute_ref_log_probs": "precompute" in options,
    }
    if "nockpt" in options:
        common["gradient_checkpointing"] = False
    timer.begin()  # setup: the trainer's construction up to its first step (TRL may precompute in either)
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    config_class, trainer_class = (KTOConfig, KTOTrainer) if job == "kto" else (DPOConfig, DPOTrainer)
    trainer = trainer_class(
        model=model,
        ref_model=reference,
        args=config_class(**common),
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
    a = trainer.args
    settings = {
        "trl": __import__("trl").__version__,
        "gradient_checkpointing": a.gradient_checkpointing,
        "precompute_ref_log_probs": a.precompute_ref_log_probs,
        "attn_implementation": model.config._attn_implementation,
        "bf16": a.bf16,
        "padding_free": getattr(a, "padding_free", None),
        "torch_compile": a.torch_compile,
        "use_liger_kernel": a.use_liger_kernel,
        "per_device_train_batch_size": a.per_device_train_batch_size,
        "max_length": a.max_length,
        "learning_rate": a.learning_rate,
        "beta": a.beta,
    }
    return {**timer.summary(), "settings": settings}


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


def run_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    name, *options = args.worker.split("+")
    known = {"trl": TRL_OPTIONS, "prospect": PROSPECT_OPTIONS}.get(name)
    if known is None or not set(options) <= known | ALLOCATORS.keys():
        parser.error(f"unknown library or option {args.worker!r}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        run = run_trl if name == "trl" else run_prospect
        result = run(
            args.job, Path(args.data), args.max_length, args.steps, out, set(options) - ALLOCATORS.keys()
        )
    result["settings"]["allocator"] = os.environ.get("LD_PRELOAD") or "glibc malloc"
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", choices=["kto", "dpo"], default="kto")
    parser.add_argument("--max-length", type=int, default=128)
    add_task_argument(parser)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument(
        "--libraries",
        default="prospect+packed+cached,trl,trl+nockpt,trl+nockpt+precompute,trl+nockpt+precompute+eager",
        help="comma separated; a library and options joined by '+'. trl: nockpt (no gradient "
        "checkpointing), precompute (reference log-probs before training), sdpa or eager (attention). "
        "prospect: packed (padding-free rows), lean (gradient checkpointing), cached (reference log-probs "
        "precomputed), eager or sdpa (transformers' attention instead of prospect's). Either library: "
        "jemalloc or tcmalloc (preloaded as the memory allocator)",
    )
    parser.add_argument(
        "--max-load", type=float, default=0.8, help="wait (up to 10 min) for the load average to fall below"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run_worker(args, parser)
        return
    wait_until_quiet(args.max_load)
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    results, loads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.jsonl"
        rows = BATCH * (args.steps + 2) * 2
        write_job_data(args.task, args.job, args.max_length, rows, data)
        for library in args.libraries.split(","):
            loads[library] = wait_until_quiet(args.max_load)
            command = [sys.executable, __file__, "--worker", library, "--job", args.job, "--data", str(data)]
            command += ["--max-length", str(args.max_length), "--steps", str(args.steps)]
            env = {**os.environ, "TQDM_DISABLE": "1", **allocator_env(set(library.split("+")))}
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(f"{library} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                continue
            results[library] = json.loads(lines[-1][len("RESULT ") :])
    report(args, peaks, results, loads)


def report(args: argparse.Namespace, peaks: dict, results: dict, loads: dict) -> None:
    sequences = BATCH * (2 if args.job == "dpo" else 1)
    mean_tokens = statistics.fmean(r["tokens_per_step"] for r in results.values()) if results else 0
    roofline = shape_roofline(round(mean_tokens), model_dir()) if results else float("nan")
    print(
        f"\n{args.job.upper()} on {args.task}, SmolLM2-135M, batch {BATCH}, max length {args.max_length}, {args.steps} steps "
        f"(first excluded), {torch.get_num_threads()} threads; bf16 matmul peak {peaks['bf16']:.0f} GFLOP/s "
        f"(known {KNOWN_BF16_PEAK.get(cpu_kind()[1], 0.0) * torch.get_num_threads():.0f} on {' / '.join(cpu_kind())}), fp32 {peaks['fp32']:.0f}; the model's own bf16 shapes at "
        f"{mean_tokens:.0f} rows reach {roofline:.0f} GFLOP/s"
    )
    header = (
        f"{'library':>34} {'load':>5} {'tokens/s':>9} {'s/step':>7} {'peak RSS MB':>11} {'GFLOP/s':>8} "
        f"{'% peak':>7} {'% shapes':>8} {'step-1 loss':>11} {'setup s':>7}"
    )
    print(header)
    for library, r in results.items():
        precomputed = "cached" in library or "precompute" in library
        flops = useful_flops_per_token(
            args.job, r["tokens_per_step"] / sequences, reference_in_step=not precomputed
        )
        ran = r["tokens_per_s"] * flops * r["computed_fraction"] / 1e9  # only the tokens the network ran
        setup = f"{r['setup_seconds']:.0f}" if precomputed else "-"
        loss = r["first_loss"] if r["first_loss"] is not None else float("nan")
        print(
            f"{library:>34} {loads[library]:>5.2f} {r['tokens_per_s']:>9.0f} {r['step_seconds']:>7.2f} "
            f"{r['peak_rss_mb']:>11.0f} {ran:>8.0f} {100 * ran / peaks['bf16']:>6.1f}% "
            f"{100 * ran / roofline:>7.1f}% {loss:>11.4f} {setup:>7}"
        )
    trl = {k: v for k, v in results.items() if k.startswith("trl")}
    if trl:
        fastest = max(trl, key=lambda k: trl[k]["tokens_per_s"])
        for name, p in results.items():
            if name.startswith("prospect"):
                for peer in dict.fromkeys([fastest, "trl"]):
                    if peer in trl:
                        t = trl[peer]
                        print(
                            f"{name} / {peer}{' (TRL fastest)' if peer == fastest else ' (TRL default)'}: "
                            f"tokens/s x{p['tokens_per_s'] / t['tokens_per_s']:.2f}, "
                            f"peak RSS x{p['peak_rss_mb'] / t['peak_rss_mb']:.2f}"
                        )
    print("\nsettings:")
    for library, r in results.items():
        print(f"  {library}: " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()))


if __name__ == "__main__":
    main()
