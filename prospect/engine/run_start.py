"""The start every trainer shares, the text trainers' and the denoiser's: the loss and its options, the
accelerator, the run directory claimed and announced before anything slow, and made once every input has
loaded. A trainer overrides the checks it needs (`check_options`, `check_distribution`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from prospect.config import Config
from prospect.engine.checks import check_run_options, check_sharding, check_trackers
from prospect.engine.heads import HEADS
from prospect.engine.launch import make_accelerator
from prospect.engine.rundir import RunDir
from prospect.engine.sharding import fsdp_on_cpu
from prospect.losses import get_loss
from prospect.losses.base import LossSpec


class RunStart:
    cfg: Config
    callbacks: list[Callable[..., None]]
    spec: LossSpec
    params: Any
    accelerator: Accelerator
    sharded: bool
    fsdp_on_cpu: bool
    run: RunDir
    run_dir: Path
    step: int
    skips: int
    skips_in_a_row: int

    def open_run(self, config: Config, callbacks: list[Callable[..., None]] | None) -> None:
        """What every trainer starts with, before anything slow: the loss and its options checked, the
        accelerator, the run directory claimed and announced (made only by `create_run`)."""
        self.cfg, self.callbacks = config, callbacks or []
        spec = get_loss(config.loss_name)
        self.params = spec.make_params(config.loss, f"{config.source}: loss")
        self.spec = spec.resolved(self.params)  # a declaration may follow its options (GRPO, beta 0)
        self.check_options()
        # With no GPU, multi-process launches run over gloo on the CPU (DDP, FSDP2 or DeepSpeed ZeRO).
        self.accelerator = make_accelerator(
            config.train, log_with=self.trackers(), project_dir=config.train.output_dir
        )
        self.check_distribution()
        self.run = RunDir(config)
        self.run_dir = self.run.path
        if self.accelerator.is_main_process:
            print(self.run.announce(report=self.reports_samples()), flush=True)

    def create_run(self) -> None:
        """Every input has loaded: only now is the run directory made."""
        self.step = 0
        self.skips = self.skips_in_a_row = 0  # updates skipped for a non-finite loss or gradient
        if self.accelerator.is_main_process:
            self.run.create()
        self.accelerator.wait_for_everyone()

    def check_distribution(self) -> None:
        """How the weights are spread over processes, and whether the model allows it."""
        self.sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.fsdp_on_cpu = fsdp_on_cpu(self.accelerator)  # sharded by prospect: accelerate will not on CPU
        check_sharding(self.sharded or self.fsdp_on_cpu, self.cfg.model)

    def reports_samples(self) -> bool:
        """Whether the run evaluates sampled completions (a reward model does not)."""
        return HEADS[self.spec.model].samples_for_evaluation

    def check_options(self) -> None:
        """Settings that only make sense together, checked before anything loads."""
        check_run_options(self.cfg, self.spec)

    def trackers(self) -> list[str] | None:
        return check_trackers(self.cfg.train.report_to)
