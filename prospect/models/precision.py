"""Which precision a run computes in: one decision, used by training, sampling and evaluation alike."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def bf16_supported(device: torch.device) -> bool:
    """Whether the device has fast bf16 matmuls (CPUs with AVX-512 BF16 or AMX, most recent GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def use_bf16(precision: str, device: torch.device) -> bool:
    """`train.precision`: 'bf16' and 'fp32' as asked; 'auto' is bf16 where the device runs it fast."""
    if precision == "bf16" and not bf16_supported(device):
        log.warning("bf16 requested but %s has no fast bf16 matmuls; it will be slow", device)
    return precision == "bf16" or (precision == "auto" and bf16_supported(device))


def cpu_only() -> bool:
    """No accelerator: every process runs on the CPU and multi-process launches are DDP over gloo."""
    if torch.accelerator.is_available():
        return False
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() == "true":
            log.warning("%s needs GPUs; with none here the processes run DDP over gloo on the CPU", name)
    return True
