"""The run's Accelerator for each kind of launch, and DeepSpeed's engine made to step as prospect does.

With no GPU, multi-process launches run over gloo on the CPU: DDP, FSDP2 (sharded by prospect, see
`sharding.py`) or DeepSpeed ZeRO. DeepSpeed's engine makes the optimizer step inside accelerate's `backward`
(clip, skip a non-finite update, update); prospect's `optimizer.step()` is then a no-op and
`clip_grad_norm_` returns the engine's norm, so the engine is given prospect's clipping and accumulation.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, parse_flag_from_env, set_seed
from torch import nn
from transformers.integrations import unset_hf_deepspeed_config

from prospect.config import TrainConfig
from prospect.errors import UserError
from prospect.models.precision import cpu_only, resolve_precision


def make_accelerator(train: TrainConfig, **kwargs: Any) -> Accelerator:
    """prospect casts itself (train.precision, reconciled with a launch config's mixed_precision by
    `resolve_precision`), so accelerate's own autocast stays off: it would wrap the policy but not the
    reference.

    DeepSpeed on CPU processes: accelerate 1.15 finds no backend without a GPU and would make each process a
    world of one (`AcceleratorState`: backend None, so num_processes 1, yet DistributedType.DEEPSPEED); the
    process group is set up over gloo first, and `cpu=True`, which turns DeepSpeed off, is not passed."""
    resolve_precision(train.precision)  # a conflict fails here, before any data or model is read
    kwargs["mixed_precision"] = "no"
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise UserError('a DeepSpeed launch needs deepspeed: pip install -e ".[deepspeed]"')
    if deepspeed and cpu_only() and "LOCAL_RANK" in os.environ:
        skip_shared_memory_op()
        PartialState(backend="gloo")
        accelerator = Accelerator(**kwargs)
    else:
        accelerator = Accelerator(cpu=cpu_only(), **kwargs)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        configure_deepspeed(accelerator.state.deepspeed_plugin.deepspeed_config, train)
        # Models load whole (the reference copy is taken from the loaded policy) and the engine partitions
        # them: transformers, told of ZeRO-3, would partition them as they load (zero.Init).
        unset_hf_deepspeed_config()
    return accelerator


def configure_torch(train: TrainConfig) -> None:
    """Threads, deterministic algorithms and every seed (python, numpy, torch), before any model is built."""
    if train.threads > 0:
        torch.set_num_threads(train.threads)
    if train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every new tensor with NaN, which no kernel here reads (about 4,000
        # fills in a short KTO step). Turned off, results are bit for bit the same (tests/test_engine.py).
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    set_seed(train.seed)


def skip_shared_memory_op() -> None:
    """DeepSpeed's CPU backend compiles a shared-memory all-reduce (a C++ build) as it starts, for its
    tensor-parallel inference only. Marked unavailable, training needs no compiler."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    deepspeed.ops.__compatible_ops__[get_accelerator().create_op_builder("ShareMemCommBuilder").NAME] = False


def configure_deepspeed(config: dict[str, Any], train: TrainConfig) -> None:
    """The engine clips at train.max_grad_norm (0: not at all), steps once per prospect step and keeps fp32
    weights."""
    if config.get("gradient_accumulation_steps", 1) not in (1, "auto"):
        raise UserError(
            "DeepSpeed config: gradient_accumulation_steps must be 1; prospect accumulates (train.grad_accum)"
        )
    for dtype in ("fp16", "bf16"):  # the engine would hold the policy's weights in it, not the reference's
        if str(config.get(dtype, {}).get("enabled", False)).lower() == "true":
            raise UserError(
                f"DeepSpeed config: {dtype}.enabled must be false or auto; prospect casts itself (train.precision)"
            )
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = max(train.max_grad_norm, 0.0)
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":  # no dataloader to read it from
        config["train_micro_batch_size_per_gpu"] = train.batch_size
    if config.get("zero_optimization", {}).get("stage") == 3:  # final/ needs the gathered weights
        config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True


@contextlib.contextmanager
def accumulating(accelerator: Accelerator, module: nn.Module, last: bool) -> Iterator[None]:
    """One microbatch's backward. Before the step's last, gradients are only accumulated: DDP and FSDP do not
    reduce them (`no_sync`), and DeepSpeed's engine is told the step's boundary is not reached."""
    if last:
        yield
    elif accelerator.distributed_type != DistributedType.DEEPSPEED:
        with accelerator.no_sync(module):
            yield
    else:
        accelerator.sync_gradients = False
        try:
            yield
        finally:
            accelerator.sync_gradients = True
