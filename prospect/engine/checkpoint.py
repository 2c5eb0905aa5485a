"""Resumable checkpoints in safetensors and JSON only (no pickle), written atomically, and the final model.

A checkpoint is a directory `step-000050` holding the trainable weights, the optimizer state, the
scheduler and trainer state, and each process's RNG state. It is written under a temporary name and
renamed into place, so a directory with the final name is always complete. `Checkpointer` does this for a
run, on every process; the functions below it are the file formats.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from prospect.errors import UserError
from prospect.io import write_json

log = logging.getLogger(__name__)
SHARDED_STATE = "sharded"  # FSDP / DeepSpeed checkpoints: accelerate's own per-rank state

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first. Temporary directories never match."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def temporary_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{step_dir_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, root: Path, step: int, keep_last: int) -> Path:
    """fsync the files, rename the directory into place, then prune older complete checkpoints."""
    for file in tmp.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    final = root / step_dir_name(step)
    if final.exists():  # never true in a normal run; keep the old one complete until the new one is in place
        stale = root / f".{final.name}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(final, stale)
        os.rename(tmp, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(root)
    if keep_last > 0:
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def fault(point: str, step: int) -> None:
    """Fault injection for the kill tests: PROSPECT_FAULT=<point>:<step> kills this process (SIGKILL) there."""
    if os.environ.get("PROSPECT_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_weights(model: torch.nn.Module, path: Path, trainable_only: bool = True) -> None:
    """Parameters by name: the trainable ones (for LoRA, the adapter), or all of them."""
    tensors = {
        n: p.detach().contiguous().cpu()
        for n, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    }
    save_file(tensors, str(path))


def load_weights(model: torch.nn.Module, path: Path, trainable_only: bool = True) -> None:
    tensors = load_file(str(path))
    wanted = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    if set(tensors) != set(wanted):
        raise ValueError(f"{path}: checkpoint weights do not match the model's parameters")
    with torch.no_grad():
        for name, param in wanted.items():
            param.copy_(tensors[name])


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(directory / "optimizer.safetensors"))
    write_json(directory / "optimizer.json", {"param_groups": state["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_rng(path: Path) -> None:
    save_file({"torch": torch.get_rng_state()}, str(path))
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    if isinstance(np_state, dict):  # only for a bit generator other than the global MT19937
        raise RuntimeError("numpy's global random state is not MT19937; cannot save it")
    write_json(
        path.with_suffix(".json"),
        {
            "python": [py_version, list(py_state), py_gauss],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        },
    )


def load_rng(path: Path) -> None:
    torch.set_rng_state(load_file(str(path))["torch"])
    meta = json.loads(path.with_suffix(".json").read_text())
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, *rest = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


class Checkpointer:
    """Save and restore one run's state, and export its final model. Built with what it saves; it never
    reads the trainer. `loop_state` and `load_loop_state` carry a loop's own state (PPO's KL coefficient);
    `refreshed_reference` is a TR-DPO reference that changes during training and so must be saved too."""

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        policy: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        tokenizer: Any,
        keep_last: int,
        sharded: bool,
        lora: bool,
        refreshed_reference: nn.Module | None = None,
        loop_state: Callable[[], dict] = dict,
        load_loop_state: Callable[[dict], None] = lambda state: None,
    ):
        self.acc, self.run_dir, self.policy = accelerator, run_dir, policy
        self.optimizer, self.scheduler, self.tokenizer = optimizer, scheduler, tokenizer
        self.keep_last, self.sharded, self.lora = keep_last, sharded, lora
        self.refreshed_reference = refreshed_reference
        self.loop_state, self.load_loop_state = loop_state, load_loop_state
        self.root = run_dir / "checkpoints"

    def raw_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def save(self, step: int, total_steps: int) -> Path | None:
        acc = self.acc
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        if acc.is_main_process:
            tmp = temporary_dir(self.root, step)
        acc.wait_for_everyone()
        if self.sharded:  # every rank writes its shard of weights and optimizer state
            acc.save_state(str(tmp / SHARDED_STATE), safe_serialization=True)
        if acc.is_main_process:
            if not self.sharded:
                save_weights(acc.unwrap_model(self.policy), tmp / "model.safetensors")
                save_optimizer(self.raw_optimizer(), tmp)
            fault("checkpoint-write", step)
            if self.refreshed_reference is not None:
                save_weights(self.refreshed_reference, tmp / "reference.safetensors", trainable_only=False)
            write_json(tmp / "scheduler.json", self.scheduler.state_dict())
        acc.wait_for_everyone()
        save_rng(tmp / f"rng-{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            state = {
                "step": step,
                "total_steps": total_steps,
                "world_size": acc.num_processes,
                "extra": self.loop_state(),
            }
            write_json(tmp / STATE_FILE, state)
            final = commit(tmp, self.root, step, self.keep_last)
        acc.wait_for_everyone()
        return final

    def resume(self, total_steps: int) -> int:
        """Restore the newest complete checkpoint; return its step (0 when there is none yet)."""
        found = complete_checkpoints(self.root)
        if not found:
            log.warning("%s: no complete checkpoint yet; starting from step 0", self.run_dir)
            return 0
        step, path = found[-1]
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != self.acc.num_processes:
            raise UserError(
                f"{path}: written by {state['world_size']} processes; resume with the same number"
            )
        if self.sharded:
            self.acc.load_state(str(path / SHARDED_STATE))
        else:
            load_weights(self.acc.unwrap_model(self.policy), path / "model.safetensors")
            load_optimizer(self.raw_optimizer(), path)
        if self.refreshed_reference is not None:
            load_weights(self.refreshed_reference, path / "reference.safetensors", trainable_only=False)
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        load_rng(path / f"rng-{self.acc.process_index}.safetensors")
        self.load_loop_state(state.get("extra", {}))
        if self.acc.is_main_process:
            print(f"resumed from {path} (step {step} of {total_steps})", flush=True)
        return step

    def save_final_model(self) -> Path:
        """A plain transformers checkpoint (config, safetensors, tokenizer with chat template); LoRA is merged
        into it and also kept in `final/adapter/`."""
        final = self.run_dir / "final"
        acc = self.acc
        # FSDP and ZeRO-3 hold shards: gather the full weights (a collective, so on every rank).
        full = acc.get_state_dict(self.policy) if self.sharded else None
        if acc.is_main_process:
            model = acc.unwrap_model(self.policy).model
            tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=self.run_dir))
            if self.lora:
                model.save_pretrained(tmp / "adapter")
                model = copy.deepcopy(model).merge_and_unload()
            weights = None if full is None else {k.removeprefix("model."): v for k, v in full.items()}
            model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            self.tokenizer.save_pretrained(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            print(f"saved {final}", flush=True)
        acc.wait_for_everyone()
        return final
