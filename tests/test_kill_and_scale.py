"""Runs killed with SIGKILL resume bit-identically; 2 CPU processes (DDP over gloo) match 1 process."""

from __future__ import annotations

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


def test_fsdp_on_two_cpu_processes_trains_to_the_weights_of_one(tiny_model_dir, tmp_path):
    """accelerate offers FSDP only on GPUs; on CPU processes prospect shards with torch's fully_shard. Two
    sharded processes x 4 must reach one process x 4 x 2 accumulation steps, with clipping active, held-out
    sampling and a resume from a checkpoint on the way; its checkpoints hold the same files as an unsharded
    run's, so the resumed steps are checked too."""
    data = write_jsonl(tmp_path / "pairs.jsonl", paired_rows(32))
    options = {
        "loss.name": "dpo",
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.save_every": 2,
        "train.keep_last": 2,
        "train.max_grad_norm": 0.05,  # below the gradient norms: clipping acts on every step
        "eval.num_prompts": 4,
        "eval.max_new_tokens": 6,
    }
    one = cli(tiny_overrides(tiny_model_dir, data, tmp_path / "one", **options, **{"train.grad_accum": 2}))
    assert one.returncode == 0, one.stderr
    fsdp = accelerate_launch("fsdp_cpu_2proc.yaml")
    two = cli(tiny_overrides(tiny_model_dir, data, tmp_path / "two", **options), launcher=fsdp)
    assert two.returncode == 0, two.stderr
    assert "4 x 1 accum x 2 proc FSDP2 on CPU" in two.stdout
    step2 = load_file(str(tmp_path / "two" / "checkpoints" / "step-000002" / "model.safetensors"))
    one_at_2 = load_file(str(tmp_path / "one" / "checkpoints" / "step-000002" / "model.safetensors"))
    assert step2.keys() == one_at_2.keys()  # the same files as an unsharded run's: full weights, by name
    assert max((step2[k] - one_at_2[k]).abs().max().item() for k in step2) < 1e-5
    straight = weights(tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-000004")  # as if killed before step 4 was saved
    resumed = cli(
        [*tiny_overrides(tiny_model_dir, data, tmp_path / "two", **options), "train.resume=true"],
        launcher=fsdp,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "(step 2 of 4)" in resumed.stdout
    assert same(weights(tmp_path / "two"), straight)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    metrics = [
        [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    assert [m["step"] for m in metrics[1]] == [1, 2, 3, 4]
    for m1, m2 in zip(*metrics):
        assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-5)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
        assert m1["grad_norm"] > 0.05
    after = [json.loads((tmp_path / r / "eval_after.json").read_text()) for r in ("one", "two")]
    assert after[0]["kl_mean"] == pytest.approx(after[1]["kl_mean"], abs=1e-4)


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
