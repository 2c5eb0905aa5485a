"""Resumable checkpoints in safetensors and JSON only (no pickle), written atomically, and the final model.

A checkpoint is a directory `step-000050` holding the trainable weights, the optimizer state, the
scheduler and trainer state, and each process's RNG state. It is written under a temporary name, its
manifest (every file's size and hash) last, and renamed into place. Resume verifies the manifest and falls
back to the newest intact checkpoint, so a truncated or half-deleted one is never trusted; old ones are
renamed away before they are deleted. `Checkpointer` does this for a
run, on every process; the functions below it are the file formats.
"""

from __future__ import annotations

import copy
import hashlib
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

from prospect.engine.sharding import assign, full_state, full_weights, load_full_state, local, untied
from prospect.errors import UserError
from prospect.io import write_json
from prospect.models.loading import GIVEN_NAME, SOURCE_DTYPE

log = logging.getLogger(__name__)
SHARDED_STATE = "sharded"  # FSDP / DeepSpeed checkpoints: accelerate's own per-rank state

STEP_DIR = re.compile(r"^step-(\d{6,})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"  # written last: {file: [size, blake2b]} of every other file
LEFTOVERS = (".step-*.tmp", ".step-*.stale", ".step-*.deleting")  # what a killed save or prune leaves


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoints that were committed, oldest first (`damage` tells whether one is still
    intact). Temporary directories never match; checkpoints written before manifests existed count when
    their state file is there."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = STEP_DIR.match(child.name)
        if match and ((child / MANIFEST).is_file() or (child / STATE_FILE).is_file()):
            found.append((int(match.group(1)), child))
    return sorted(found)


def file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def files_of(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Every file's size and hash, written after all of them."""
    write_json(
        directory / MANIFEST,
        {str(p.relative_to(directory)): [p.stat().st_size, file_digest(p)] for p in files_of(directory)},
    )


def damage(directory: Path) -> str | None:
    """What is wrong with a committed checkpoint, or None when every file its manifest lists is whole."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return None if (directory / STATE_FILE).is_file() else f"no {MANIFEST}"  # older format
    try:
        listed = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for name, (size, digest) in listed.items():
        file = directory / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size}"
        if file_digest(file) != digest:
            return f"{name} does not match its hash"
    return None


def newest_intact(root: Path) -> tuple[int, Path] | None:
    """The newest checkpoint that passes `damage`, warning in one line about each newer one skipped."""
    for step, path in reversed(complete_checkpoints(root)):
        problem = damage(path)
        if problem is None:
            return step, path
        log.warning("%s: %s; falling back to an older checkpoint", path, problem)
    return None


def remove_leftovers(run_dir: Path) -> None:
    """Temporary copies a killed save, prune or final export left behind."""
    for pattern in (*(f"checkpoints/{p}" for p in LEFTOVERS), ".final.*", ".best.*"):
        for leftover in run_dir.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def temporary_dir(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{step_dir_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit(tmp: Path, root: Path, step: int, keep_last: int) -> Path:
    """Write the manifest, fsync the files, rename the directory into place, then prune older checkpoints
    (each renamed away first, so a kill while deleting never leaves a directory that looks committed)."""
    write_manifest(tmp)
    for file in [*files_of(tmp), tmp / MANIFEST]:
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
            doomed = root / f".{old.name}.deleting"
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
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


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(path))


def save_in_dtype(
    model: Any, directory: Path, weights: dict[str, torch.Tensor] | None, dtype: torch.dtype
) -> None:
    """`model.save_pretrained` with its floating-point weights (`weights`, else its own, each tied weight under
    its first name) cast to `dtype`, and config.json saying so: the dtype the checkpoint came in (bf16 stays
    bf16), whatever precision training ran in. The model itself is left as it is."""
    if dtype == torch.float32:
        model.save_pretrained(directory, safe_serialization=True, state_dict=weights)
        return
    weights = untied(model, model.state_dict()) if weights is None else weights
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    model.save_pretrained(directory, safe_serialization=True, state_dict=cast)
    config = json.loads((directory / "config.json").read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")  # save_pretrained writes the model's own (fp32)
    write_json(directory / "config.json", config)


def name_adapter(directory: Path, base: str | None) -> None:
    """A saved LoRA adapter names the model the user gave (`base`), not the directory peft saw it loaded from
    (for a GGUF model, prospect's conversion cache): in adapter_config.json and in peft's README.md. peft
    saves with the loaded-from name, where it reads the base vocabulary size (no hub request)."""
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    loaded_from = config.get("base_model_name_or_path")
    if base is None or not loaded_from or loaded_from == base:
        return
    config["base_model_name_or_path"] = base
    write_json(config_file, config)
    readme = directory / "README.md"
    if readme.is_file():
        readme.write_text(readme.read_text().replace(loaded_from, base))


def save_optimizer(state: dict[str, Any], directory: Path) -> None:
    """An `optimizer.state_dict()`: its tensors in safetensors, the rest in JSON."""
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


def read_optimizer(directory: Path) -> dict[str, Any]:
    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


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
        """Write a checkpoint of this step, but never of weights that are no longer finite: the newest
        checkpoint then stays the last good one, as the error says."""
        acc = self.acc
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        finite = (
            torch.stack([torch.isfinite(local(p)).all() for p in trainable]).all().float()
            if trainable
            else None
        )
        if finite is not None and float(acc.reduce(finite, "min")) < 1:
            found = complete_checkpoints(self.root)
            last = (
                f"the last checkpoint, {found[-1][1].name}, holds finite ones"
                if found
                else "no checkpoint yet"
            )
            raise UserError(f"step {step}: the weights are no longer finite; not saved ({last})")
        tmp = self.root / f".{step_dir_name(step)}.tmp"
        if acc.is_main_process:
            tmp = temporary_dir(self.root, step)
        acc.wait_for_everyone()
        if self.sharded:  # every rank writes its shard of weights and optimizer state
            acc.save_state(str(tmp / SHARDED_STATE), safe_serialization=True)
        else:  # gathered in full on the main process when sharded on CPU processes (a collective)
            weights, optimizer_state = full_state(acc.unwrap_model(self.policy), self.raw_optimizer())
        if acc.is_main_process:
            if not self.sharded:
                save_tensors(weights, tmp / "model.safetensors")
                save_optimizer(optimizer_state, tmp)
            fault("checkpoint-write", step)
            if self.refreshed_reference is not None:
                save_tensors(dict(self.refreshed_reference.named_parameters()), tmp / "reference.safetensors")
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
        """Restore the newest intact checkpoint; return its step (0 when there is none yet)."""
        if self.acc.is_main_process:
            remove_leftovers(self.run_dir)
        self.acc.wait_for_everyone()
        found = newest_intact(self.root)
        if found is None:
            log.warning("%s: no intact checkpoint yet; starting from step 0", self.run_dir)
            return 0
        step, path = found
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != self.acc.num_processes:
            raise UserError(
                f"{path}: written by {state['world_size']} processes; resume with the same number"
            )
        if self.sharded:
            self.acc.load_state(str(path / SHARDED_STATE))
        else:
            saved = path / "model.safetensors"
            module, optimizer = self.acc.unwrap_model(self.policy), self.raw_optimizer()
            load_full_state(module, optimizer, load_file(str(saved)), read_optimizer(path), str(saved))
        if self.refreshed_reference is not None:
            saved = path / "reference.safetensors"
            assign(dict(self.refreshed_reference.named_parameters()), load_file(str(saved)), str(saved))
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        load_rng(path / f"rng-{self.acc.process_index}.safetensors")
        self.load_loop_state(state.get("extra", {}))
        if self.acc.is_main_process:
            print(f"resumed from {path} (step {step} of {total_steps})", flush=True)
        return step

    def save_final_model(self, name: str = "final") -> Path:
        """A plain transformers checkpoint (config, safetensors, tokenizer with chat template) in the dtype the
        model came in; LoRA is merged into it and also kept in `final/adapter/`. `name="best"`: best/."""
        final = self.run_dir / name
        acc = self.acc
        # FSDP and ZeRO-3 hold shards: gather the full weights (a collective, so on every rank; ZeRO-3 gives
        # the other ranks None).
        module = acc.unwrap_model(self.policy)
        full = untied(module, acc.get_state_dict(self.policy) or {}) if self.sharded else full_weights(module)
        if acc.is_main_process:
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.run_dir))
            self.export(module, full, tmp)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            print(f"saved {final}", flush=True)
        acc.wait_for_everyone()
        return final

    def export(self, module: Any, full: dict[str, torch.Tensor] | None, directory: Path) -> None:
        """Write the unwrapped trained `module` (`full`: its gathered weights when sharded) into `directory`."""
        model = module.model
        if self.lora:
            model.save_pretrained(directory / "adapter")
            name_adapter(directory / "adapter", getattr(model, GIVEN_NAME, None))
            model = copy.deepcopy(model).merge_and_unload()
        weights = None if full is None else {k.removeprefix("model."): v for k, v in full.items()}
        save_in_dtype(model, directory, weights, getattr(model, SOURCE_DTYPE, torch.float32))
        self.tokenizer.save_pretrained(directory)
