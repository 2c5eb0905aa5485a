"""FSDP on CPU processes: torch's `fully_shard` (FSDP2) over gloo.

accelerate 1.15 turns `ACCELERATE_USE_FSDP` into FSDP only for GPU-type launches (`state.py` sets
`DistributedType.FSDP` for MULTI_GPU, MULTI_XPU, ... and never for MULTI_CPU), so on CPU processes prospect
shards the model itself: each decoder block, then the module the loss calls, as accelerate's
TRANSFORMER_BASED_WRAP does. Checkpoints hold the full trainable weights and optimizer state, gathered on
the main process, in the same files as an unsharded run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """An FSDP launch (`configs/accelerate/fsdp.yaml`, or ACCELERATE_USE_FSDP=true) on CPU processes."""
    return (
        parse_flag_from_env("ACCELERATE_USE_FSDP")
        and accelerator.distributed_type == DistributedType.MULTI_CPU
    )


def blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules of the classes a model declares unsplittable (`_no_split_modules`)."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in module.modules() if type(m).__name__ in names]


def shard(module: nn.Module) -> None:
    """Shard each block, then the rest of `module` (embeddings, final norm, output projection), in place.
    `FSDP_RESHARD_AFTER_FORWARD=false` (accelerate's `fsdp_reshard_after_forward`) keeps gathered blocks
    until the backward, like ZeRO-2."""
    reshard = parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", default=True)
    found = blocks(module)
    if not found:
        raise ValueError(f"{type(module).__name__}: no transformer blocks (_no_split_modules) to shard")
    for block in found:
        fully_shard(block, reshard_after_forward=reshard)
    root = fully_shard(module, reshard_after_forward=reshard)
    # FSDP2 learns which module is the root from the first forward; sampling calls an inner module first
    # (the causal LM's generate), so declare the root now (torch has no public call for it).
    root._get_fsdp_state()._lazy_init()


def prepare(
    accelerator: Accelerator, module: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """accelerate's `prepare`, but a module sharded on CPU processes is not wrapped again (in DDP)."""
    if is_sharded(module) and accelerator.distributed_type == DistributedType.MULTI_CPU:
        return module, accelerator.prepare(optimizer)
    return accelerator.prepare(module, optimizer)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every parameter of a sharded module gathered for the duration (sampling, a reference refresh): inner
    modules then run without collectives, so processes may make different numbers of forwards. DeepSpeed
    ZeRO-3 parameters are gathered to be read (a refresh), but its hooks still gather around each forward:
    every process must make the same forwards (held-out sampling does)."""
    zero3 = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3):
            yield
        return
    units = [m for m in module.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        reshard = parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", default=True)
        for unit in units:
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: its shard of a DTensor or of a DeepSpeed ZeRO-3 parameter."""
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def optimized_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters, in the order `optimizer.state_dict()` numbers them."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_state(
    module: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trainable weights by name, `optimizer.state_dict()`) in full on the main process, for a sharded
    module or not. On a sharded module this is a collective and the other processes get empty dicts."""
    if not is_sharded(module):
        return {
            n: p.detach() for n, p in module.named_parameters() if p.requires_grad
        }, optimizer.state_dict()
    weights: dict[str, Any] = get_model_state_dict(module, options=FULL)
    by_name: dict[str, Any] = get_optimizer_state_dict(module, optimizer, options=FULL)
    if not weights:
        return {}, {}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    index = {name: i for i, name in enumerate(optimized_names(module, optimizer))}
    return {n: t for n, t in weights.items() if n in trainable}, {
        "state": {index[n]: s for n, s in by_name["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]],
    }


def load_full_state(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    source: str,
) -> None:
    """The inverse of `full_state`; every process passes the full dicts, read from `source`."""
    if not is_sharded(module):
        assign({n: p for n, p in module.named_parameters() if p.requires_grad}, weights, source)
        optimizer.load_state_dict(optimizer_state)
        return
    names = optimized_names(module, optimizer)
    set_model_state_dict(
        module, cast(dict[str, Any], weights), options=StateDictOptions(full_state_dict=True, strict=False)
    )
    by_name: dict[str, Any] = {
        "state": {names[i]: s for i, s in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def assign(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into the parameters of the same names, which must be exactly these."""
    if set(tensors) != set(params):
        raise ValueError(f"{source}: the weights do not match the model's parameters")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def full_weights(module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every weight of a sharded module, on the main process (a collective); None for an unsharded module."""
    if not is_sharded(module):
        return None
    return untied(module, cast(dict[str, torch.Tensor], get_model_state_dict(module, options=FULL)))


def untied(module: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`module`'s gathered `weights` with a tied weight under its first name only, as an unsharded module
    saves it."""
    first: dict[int, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        first.setdefault(id(tensor), name)
    return {name: weights[name] for name in first.values() if name in weights}
