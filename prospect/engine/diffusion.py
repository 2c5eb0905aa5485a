"""Diffusion-DPO and supervised fine-tuning of a diffusers denoiser, on the engine's loop.

`DiffusionTrainer` is a `Trainer` with its own set-up and microbatches; the rest is the engine's: the run
directory, accelerate (one process or DDP), the batch order, the step normalised over all its microbatches
and processes, the optimizer step with its non-finite guard, atomic checkpoints and exact resume,
metrics.jsonl, trackers and callbacks. A microbatch is its items' images (pairs: the chosen rows, then the
rejected ones), each item noised from its own seed of (run seed, step, item), which a pair's two images
share. Noise therefore does not depend on the process that draws it, so two processes match one that
accumulates, and a resumed run draws what the killed one would have. The loss sees each image's denoising
error under the policy and, for Diffusion-DPO, under a frozen copy of the initial denoiser.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType

from prospect.config import Config
from prospect.data.images import ImageItem, pixel_batch, read_image_items
from prospect.engine.checkpoint import Checkpointer
from prospect.engine.launch import configure_torch
from prospect.engine.metrics import StepStats
from prospect.engine.periodic_eval import Evaluations
from prospect.engine.publish import check_push_target
from prospect.engine.reference_plan import BatchOrder
from prospect.engine.trainer import StepResult, Trainer
from prospect.errors import UserError
from prospect.losses.base import LossInputs, LossSpec
from prospect.models.denoiser import (
    Conditioner,
    Denoiser,
    DenoiserParts,
    denoising_errors,
    geometry_of,
    load_denoiser,
    locate,
    noise_for,
    save_denoiser,
    to_model_space,
)
from prospect.models.precision import use_bf16
from prospect.models.reference import frozen_copy

SEED_STRIDE = 1_000_003  # a prime: (seed, step, item) -> one noise seed, distinct for every item of a run
UNSUPPORTED = (
    (
        "reference_cache",
        "train.reference_cache: the reference errors depend on each step's noise; not cached",
    ),
    ("reference_refresh_every", "train.reference_refresh_every is not supported for denoisers"),
    (
        "reference_model",
        "train.reference_model is not supported for denoisers: the reference is the initial one",
    ),
)


@dataclass
class ImageBatch:
    indices: list[int]  # the items' places in the training data (each item's noise seed)
    items: list[ImageItem]
    locations: list[str]
    units: int


class DenoiserCheckpointer(Checkpointer):
    """Checkpoints as for language models; the final model in the diffusers layout it came in."""

    def __init__(self, parts: DenoiserParts, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.parts = parts

    def export(self, module: Any, full: dict[str, torch.Tensor] | None, directory: Path) -> None:
        save_denoiser(self.parts, module.unet, directory)


def check_diffusion_options(config: Config, spec: LossSpec) -> None:
    """Options a denoiser run cannot honour, refused before anything loads."""
    t, e = config.train, config.eval
    for option, message in UNSUPPORTED:
        if getattr(t, option):
            raise UserError(message)
    if config.model.lora_r > 0 or t.reference == "adapter":
        raise UserError(f"loss '{spec.name}': LoRA denoisers are not supported; set model.lora_r=0")
    if e.num_prompts or e.every:
        raise UserError(
            f"loss '{spec.name}': eval.num_prompts and eval.every evaluate language models; a denoiser is "
            "evaluated on its samples (prospect.evaluation.digits, scripts/digits_diffusion.py)"
        )
    if t.push_to_hub and locate(config.model.name)[1]:
        raise UserError(
            "train.push_to_hub: a pipeline folder's final/ is not pushed; upload it with `hf upload`"
        )
    if t.push_to_hub:
        check_push_target(t.push_to_hub, "train.push_to_hub")


class DiffusionTrainer(Trainer):
    throughput_unit = "images"

    def __init__(self, config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None):
        t, d = config.train, config.data
        self.open_run(config, callbacks)
        self.geometry = geometry_of(config.model.name)
        pairs = self.spec.data == "paired"
        self.items = read_image_items(d.train, d.train_split, d.subset, pairs, self.geometry, d.limit)
        self.evals = Evaluations(config, self.spec, None, self.run_dir, self.accelerator.is_main_process)
        configure_torch(t)
        self.device = self.accelerator.device
        self.bf16 = use_bf16(t.precision, self.device)
        self.parts = load_denoiser(config.model)
        self.conditioner = Conditioner(self.parts)
        for item in self.items:
            self.conditioner.check(item.prompt, item.location)
        for frozen in (self.parts.text_encoder, self.parts.vae):
            if frozen is not None:
                frozen.to(self.device)
        self.world = self.accelerator.num_processes
        self.order = BatchOrder(len(self.items), t.seed, t.batch_size, t.grad_accum, self.world)
        self.global_batch = self.order.global_batch
        self.total_steps = self.order.total_steps(t.max_steps, t.epochs, d.train)
        self.reference_denoiser: Denoiser | None = None
        if self.spec.needs_reference:
            self.reference_denoiser = Denoiser(frozen_copy(self.parts.unet), self.bf16).to(self.device)
        self.build_optimizer(Denoiser(self.parts.unet, self.bf16))
        self.checkpointer = DenoiserCheckpointer(
            self.parts,
            self.accelerator,
            self.run_dir,
            self.policy,
            self.optimizer,
            self.scheduler,
            None,
            t.keep_last,
            sharded=False,
            lora=False,
            loop_state=self.loop_state,
            load_loop_state=self.load_loop_state,
        )
        self.create_run()

    def check_options(self) -> None:
        check_diffusion_options(self.cfg, self.spec)

    def check_distribution(self) -> None:
        super().check_distribution()
        if self.sharded or self.fsdp_on_cpu:
            kind = self.accelerator.distributed_type.value
            raise UserError(
                f"loss '{self.spec.name}': denoisers train on one process or with DDP, not {kind}"
            )

    def reports_samples(self) -> bool:
        return False

    # The engine's loop hands on what `make_batch` returns; for a denoiser that is an ImageBatch.
    def make_batch(self, indices: list[int]) -> ImageBatch:  # type: ignore[override]
        items = [self.items[i] for i in indices]
        return ImageBatch(indices, items, [item.location for item in items], len(items))

    def units(self, batch: ImageBatch) -> int:  # type: ignore[override]
        return batch.units

    def microbatch_loss(self, batch: ImageBatch, stats: StepStats) -> torch.Tensor:  # type: ignore[override]
        """The loss of one microbatch: every image noised with its item's noise at its item's timestep, and
        denoised by the reference (no gradient, first) and the policy."""
        clean = to_model_space(self.parts, pixel_batch(batch.items, self.geometry).to(self.device))
        sides = clean.shape[0] // len(batch.items)  # 2 for pairs, whose images share noise and timestep
        seeds = [(self.cfg.train.seed * SEED_STRIDE + self.step) * SEED_STRIDE + i for i in batch.indices]
        schedule = self.parts.scheduler
        noise, timesteps = noise_for(seeds, tuple(clean.shape[1:]), schedule.config.num_train_timesteps)
        noise, timesteps = (
            noise.repeat(sides, 1, 1, 1).to(self.device),
            timesteps.repeat(sides).to(self.device),
        )
        condition = self.conditioner([item.prompt for item in batch.items] * sides, self.device)
        reference = None
        if self.reference_denoiser is not None:
            with torch.no_grad():
                reference = denoising_errors(
                    self.reference_denoiser, schedule, clean, noise, timesteps, condition
                )
        errors = denoising_errors(self.policy, schedule, clean, noise, timesteps, condition)
        out = self.spec.compute(LossInputs(policy_errors=errors, reference_errors=reference), self.params)
        return self.record(out, stats, batch.units, float(clean.shape[0]))

    def banner(self) -> str:
        t, kind, unet = self.cfg.train, self.accelerator.distributed_type, self.parts.unet
        weights = sum(p.numel() for p in unet.parameters()) / 1e6
        what = "pairs" if self.spec.data == "paired" else "images"
        size = f"{self.geometry.resolution}x{self.geometry.resolution}"
        return (
            f"prospect {self.spec.name}: {len(self.items)} {what} ({size}), {type(unet).__name__} of "
            f"{weights:.2f}M weights{', in a VAE latent space' if self.parts.vae is not None else ''}, "
            f"{self.total_steps} steps of {self.global_batch} ({t.batch_size} x {t.grad_accum} accum x "
            f"{self.world} proc{'' if kind == DistributedType.NO else ' ' + kind.value}), reference="
            f"{'frozen copy' if self.reference_denoiser is not None else 'none'}, precision="
            f"{'bf16 autocast' if self.bf16 else 'fp32'}, run dir {self.run_dir}"
        )
