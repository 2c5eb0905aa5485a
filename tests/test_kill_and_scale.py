"""Runs killed with SIGKILL resume bit-identically; 2 CPU processes (DDP over gloo) match 1 process."""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import paired_rows, tiny_overrides, varied_paired_rows, write_jsonl

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def cli(
    args: list[str], env: dict | None = None, launcher: list[str] | None = None
) -> subprocess.CompletedProcess:
    command = (launcher or [sys.executable, "-m"]) + ["prospect.cli", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, env={**ENV, **(env or {})}, timeout=600)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every killed run must reproduce."""
    data = write_jsonl(
        tmp_path_factory.mktemp("data") / "kto.jsonl",
        [
            json.loads(x)
            for x in (Path(__file__).parent / "bad_inputs" / "good.jsonl").read_text().splitlines()
        ]
        * 3,
    )
    run = tmp_path_factory.mktemp("straight") / "run"
    options = {"train.max_steps": 6, "train.save_every": 1, "train.keep_last": 2, "train.batch_size": 4}
    done = cli(tiny_overrides(tiny_model_dir, data, run, **options))
    assert done.returncode == 0, done.stderr
    return data, options, weights(run)


@pytest.mark.parametrize("fault", ["step:3", "checkpoint-write:4", "checkpoint-write:1", "step:6"])
def test_sigkill_at_a_fault_point_resumes_bit_identically(fault, straight, tiny_model_dir, tmp_path):
    data, options, expected = straight
    run = tmp_path / "run"
    killed = cli(tiny_overrides(tiny_model_dir, data, run, **options), env={"PROSPECT_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL
    checkpoints = (
        sorted(p.name for p in (run / "checkpoints").iterdir()) if (run / "checkpoints").exists() else []
    )
    point, step = fault.split(":")
    if point == "checkpoint-write":  # the half-written checkpoint is only a temporary directory
        assert f".step-{int(step):06d}.tmp" in checkpoints and f"step-{int(step):06d}" not in checkpoints
    resumed = cli(tiny_overrides(tiny_model_dir, data, run, **options, **{"train.resume": True}))
    assert resumed.returncode == 0, resumed.stderr
    assert same(weights(run), expected)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    kept = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert kept == ["step-000005", "step-000006"]  # keep_last=2, and never fewer than one good one


@pytest.mark.parametrize("allocator", ["tcmalloc_minimal", "jemalloc"])
def test_another_memory_allocator_trains_the_same_weights(allocator, straight, tiny_model_dir, tmp_path):
    """benchmarks/README.md and docs/scale.md advise preloading tcmalloc for speed: the weights must not move."""
    library = ctypes.util.find_library(allocator)
    if library is None:
        pytest.skip(f"{allocator} is not installed (Debian: libtcmalloc-minimal4, libjemalloc2)")
    data, options, expected = straight
    run = tmp_path / "run"
    done = cli(tiny_overrides(tiny_model_dir, data, run, **options), env={"LD_PRELOAD": library})
    assert done.returncode == 0, done.stderr
    assert same(weights(run), expected)


def damage_newest(run: Path, how: str) -> None:
    """Break the newest checkpoint the way a crash, a full disk or a careless user does."""
    newest = run / "checkpoints" / "step-000004"
    if how == "truncated weights":
        weights_file = newest / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:1000])
    elif how == "missing scheduler":
        (newest / "scheduler.json").unlink()
    elif how == "flipped optimizer byte":  # same size, different content: only the hash tells
        state = bytearray((newest / "optimizer.safetensors").read_bytes())
        state[-5] ^= 0xFF
        (newest / "optimizer.safetensors").write_bytes(bytes(state))
    elif how == "missing rng":
        (newest / "rng-0.safetensors").unlink()


@pytest.mark.parametrize(
    "how", ["truncated weights", "missing scheduler", "flipped optimizer byte", "missing rng"]
)
def test_resume_falls_back_past_a_damaged_checkpoint(how, straight, tiny_model_dir, tmp_path, caplog):
    """The newest checkpoint is damaged after a kill: resume warns in one line, restarts from the newest
    intact one, and still ends bit-identical to the uninterrupted run. A kill mid-write also left a
    half-written metrics line, a half-deleted old checkpoint and a temporary copy of the final model."""
    data, options, expected = straight
    run = tmp_path / "run"
    killed = cli(tiny_overrides(tiny_model_dir, data, run, **options), env={"PROSPECT_FAULT": "step:5"})
    assert killed.returncode == -signal.SIGKILL
    damage_newest(run, how)
    with open(run / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 5, "loss": 0.4')  # cut short by the kill
    (run / "checkpoints" / ".step-000002.deleting").mkdir()  # a prune the kill interrupted
    (run / ".final.abc123").mkdir()  # a final export the kill interrupted
    resumed = cli(tiny_overrides(tiny_model_dir, data, run, **options, **{"train.resume": True}))
    assert resumed.returncode == 0, resumed.stderr
    assert "step-000004: " in resumed.stderr and "falling back to an older checkpoint" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step-000003" in resumed.stdout
    assert same(weights(run), expected)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not list(run.glob(".final.*")) and not list((run / "checkpoints").glob(".*"))


def test_every_checkpoint_carries_a_manifest_written_last(straight, tiny_model_dir, tmp_path):
    data, options, _ = straight
    run = tmp_path / "run"
    done = cli(tiny_overrides(tiny_model_dir, data, run, **options))
    assert done.returncode == 0, done.stderr
    for checkpoint in (run / "checkpoints").iterdir():
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        files = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.name != "manifest.json"}
        assert set(manifest) == files and all(size > 0 for size, _ in manifest.values())


def test_sigkill_at_random_moments(straight, tiny_model_dir, tmp_path):
    """Killed from outside, at whatever moment it lands, three times in a row; then finished."""
    data, options, expected = straight
    run = tmp_path / "run"
    args = tiny_overrides(tiny_model_dir, data, run, **options)
    for attempt, delay in enumerate((4.0, 5.5, 6.5)):
        command = [
            sys.executable,
            "-m",
            "prospect.cli",
            "train",
            *args,
            *(["train.resume=true"] if attempt else []),
        ]
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
    resumed = cli([*args, "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr
    assert same(weights(run), expected)


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m"]


def accelerate_launch(config: str) -> list[str]:
    """A config of configs/accelerate by name, or any by absolute path."""
    path = Path(__file__).parents[1] / "configs" / "accelerate" / config
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(path), "-m"]


@pytest.mark.parametrize(
    "loss, launcher",
    [("dpo", torchrun(2)), ("kto", accelerate_launch("cpu_2proc.yaml"))],
    ids=["dpo-torchrun", "kto-accelerate"],
)
def test_two_processes_match_one(loss, launcher, tiny_model_dir, tmp_path):
    """Global batch 8: 2 processes x 4, against 1 process x 4 x 2 accumulation steps."""
    data = write_jsonl(tmp_path / "pairs.jsonl", paired_rows(32))
    options = {"loss.name": loss, "train.max_steps": 4, "train.batch_size": 4, "train.log_every": 1}
    one = cli(tiny_overrides(tiny_model_dir, data, tmp_path / "one", **options, **{"train.grad_accum": 2}))
    assert one.returncode == 0, one.stderr
    two = cli(tiny_overrides(tiny_model_dir, data, tmp_path / "two", **options), launcher=launcher)
    assert two.returncode == 0, two.stderr
    assert "4 x 1 accum x 2 proc MULTI_CPU" in two.stdout
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    metrics = [
        [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    assert metrics[0][0]["loss"] == pytest.approx(metrics[1][0]["loss"], abs=1e-6)  # step 1: reduced exactly
    if loss == "dpo":
        assert worst < 1e-5  # the same math up to float summation order
        for m1, m2 in zip(*metrics):
            assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-5)
    else:
        # KTO's reference point is estimated per microbatch step: one process accumulating sees each half
        # of the batch alone, two processes reduce it over both halves, so the runs differ slightly by design.
        assert worst < 1e-2


# Two sharded processes against one process accumulating two microbatches: 4 DPO steps with clipping active on
# every step (the gradient norms are above 0.05), a linear schedule, a TR-DPO reference refreshed at step 2 and
# held-out sampling; checkpoints every 2 steps.
SHARDED = {
    "loss.name": "dpo",
    "train.max_steps": 4,
    "train.lr_scheduler": "linear",
    "train.save_every": 2,
    "train.keep_last": 2,
    "train.max_grad_norm": 0.05,
    "train.reference_refresh_every": 2,
    "eval.num_prompts": 4,
    "eval.max_new_tokens": 6,
}


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(data, run) of one process x 4 pairs x 2 accumulation steps, which the sharded runs must reproduce."""
    root = tmp_path_factory.mktemp("one-process")
    data = write_jsonl(root / "pairs.jsonl", paired_rows(32))
    options = {**SHARDED, "train.batch_size": 4, "train.grad_accum": 2}
    done = cli(tiny_overrides(tiny_model_dir, data, root / "run", **options))
    assert done.returncode == 0, done.stderr
    return data, root / "run"


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two sets of weights, which must have the same names."""
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resumes_bit_identically(args: list[str], launcher: list[str], run: Path) -> None:
    """With the step-4 checkpoint gone, as if killed before it was saved, a resume from step 2 reproduces the
    straight run's weights bit for bit."""
    straight = weights(run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    resumed = cli([*args, "train.resume=true"], launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 2 of 4)" in resumed.stdout
    assert same(weights(run), straight)


def matches_one_process(one: Path, two: Path) -> None:
    """Losses, gradient norms, learning rates, final weights (1e-5) and the held-out KL of one process."""
    for m1, m2 in zip(metrics(one), metrics(two), strict=True):
        assert m1["step"] == m2["step"] and m1["lr"] == m2["lr"]
        assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-5)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
        assert m1["grad_norm"] > SHARDED["train.max_grad_norm"]
    assert worst(weights(one), weights(two)) < 1e-5
    after = [json.loads((r / "eval_after.json").read_text()) for r in (one, two)]
    assert after[0]["kl_mean"] == pytest.approx(after[1]["kl_mean"], abs=1e-4)


def test_fsdp_on_two_cpu_processes_trains_to_the_weights_of_one(one_process, tiny_model_dir, tmp_path):
    """accelerate offers FSDP only on GPUs; on CPU processes prospect shards with torch's fully_shard. Two
    sharded processes x 4 must reach one process x 4 x 2 accumulation steps; its checkpoints hold the same
    files as an unsharded run's, so the step-2 weights are checked too."""
    data, one = one_process
    args = tiny_overrides(tiny_model_dir, data, tmp_path / "two", **SHARDED, **{"train.batch_size": 4})
    fsdp = accelerate_launch("fsdp_cpu_2proc.yaml")
    two = cli(args, launcher=fsdp)
    assert two.returncode == 0, two.stderr
    assert "4 x 1 accum x 2 proc FSDP2 on CPU" in two.stdout
    step2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-000002" / "model.safetensors"))
    assert worst(step2, load_file(str(one / "checkpoints" / "step-000002" / "model.safetensors"))) < 1e-5
    resumes_bit_identically(args, fsdp, tmp_path / "two")
    assert [m["step"] for m in metrics(tmp_path / "two")] == [1, 2, 3, 4]
    matches_one_process(one, tmp_path / "two")


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_cpu_processes_trains_to_the_weights_of_one(
    stage, one_process, tiny_model_dir, tmp_path
):
    """DeepSpeed ZeRO through accelerate on two CPU processes (gloo) x 2 x 2 accumulation steps must reach one
    process x 4 x 2: the engine, which steps inside accelerate's backward, steps once per step and clips at
    train.max_grad_norm (its own config says 1.0); a resume reads DeepSpeed's checkpoint; no op is compiled.
    ZeRO-3 keeps whole every weight under stage3_param_persistence_threshold (1e5 elements by default: all
    of the tiny model's), so the threshold is 0 here and every weight is partitioned. Buckets of 1e6 elements
    instead of DeepSpeed's 5e8 keep each process at 0.45 GB, not 2.4 GB."""
    data, one = one_process
    buckets = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size")
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0, **dict.fromkeys(buckets, 10**6)}
    ds_config = {"zero_optimization": zero, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    (tmp_path / "deepspeed.json").write_text(json.dumps(ds_config))  # fp32: no fp16 or bf16 section
    launch = {"distributed_type": "DEEPSPEED", "num_processes": 2, "num_machines": 1}
    deepspeed_config = {"deepspeed_config_file": str(tmp_path / "deepspeed.json")}
    (tmp_path / "accelerate.json").write_text(json.dumps({**launch, "deepspeed_config": deepspeed_config}))
    options = {**SHARDED, "train.batch_size": 2, "train.grad_accum": 2}
    args = tiny_overrides(tiny_model_dir, data, tmp_path / "two", **options)
    deepspeed = accelerate_launch(str(tmp_path / "accelerate.json"))
    two = cli(args, env={"TORCH_EXTENSIONS_DIR": str(tmp_path / "ops")}, launcher=deepspeed)
    assert two.returncode == 0, two.stderr
    assert "2 x 2 accum x 2 proc DEEPSPEED" in two.stdout
    assert not (tmp_path / "ops").exists()  # DeepSpeed compiled nothing: no compiler is needed
    resumes_bit_identically(args, deepspeed, tmp_path / "two")
    matches_one_process(one, tmp_path / "two")


def test_two_processes_fill_a_packed_bf16_reference_cache_like_one(tiny_model_dir, tmp_path):
    """Each process precomputes the reference for its own microbatches, laid out as it will train on them; the
    gathered cache holds the same values as one process accumulating both microbatches computes alone."""
    from prospect.models.reference import ReferenceCache

    data = write_jsonl(tmp_path / "pairs.jsonl", varied_paired_rows(32))
    options = {
        "loss.name": "dpo",
        "train.max_steps": 3,
        "train.batch_size": 4,
        "train.precision": "bf16",
        "train.padding_free": True,
        "train.reference_cache": True,
    }
    runs = {"one": ({"train.grad_accum": 2}, None), "two": ({}, torchrun(2))}
    tables = {}
    for name, (extra, launcher) in runs.items():
        env = {"PROSPECT_CACHE": str(tmp_path / f"cache-{name}")}
        done = cli(tiny_overrides(tiny_model_dir, data, tmp_path / name, **options, **extra), env, launcher)
        assert done.returncode == 0, done.stderr
        assert "0 known, 48 computed" in done.stdout  # 3 steps x 8 pairs x 2 sequences
        (path,) = (tmp_path / f"cache-{name}" / "reference").glob("*.safetensors")
        tables[name] = ReferenceCache(path.stem, path.parent, by_layout=True).table
    assert tables["one"] == tables["two"]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "cpu_2proc"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(Path(__file__).parents[1] / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.mixed_precision == "no"  # prospect sets precision itself
    assert config.num_processes >= 2
    if name.startswith("deepspeed"):
        assert config.deepspeed_config["gradient_accumulation_steps"] == 1
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        assert config.deepspeed_config.get("zero3_save_16bit_model", True)  # final/ gathers the weights
