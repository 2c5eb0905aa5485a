"""Resumable checkpoints in safetensors and JSON only (no pickle), written atomically.

A checkpoint is a directory `step-000050` holding the trainable weights, the optimizer state, the
scheduler and trainer state, and each process's RNG state. It is written under a temporary name and
renamed into place, so a directory with the final name is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

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
    np_state = np.random.get_state()
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


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, sort_keys=True))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
