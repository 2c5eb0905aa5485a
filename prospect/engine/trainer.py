"""The one training loop. A loss declares what it needs; this loop computes it, normalises it over the
whole optimizer step, and handles devices (accelerate), precision, the reference, checkpoints and logs.

    trainer = Trainer(load_config("recipes/kto_smollm2_vader.yaml"))
    trainer.train()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import json
import logging
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from tqdm.auto import tqdm
from transformers import get_scheduler

from prospect.config import Config
from prospect.data.batching import (
    Batch,
    Sequences,
    group_batch,
    microbatch_slice,
    mismatched,
    pack,
    pad,
    paired_batch,
    rated_batch,
    sequence_key,
    step_indices,
    unpaired_batch,
)
from prospect.data.pipeline import count, encode_all, load_eval_prompts, read_training
from prospect.data.tokenize import Encoder
from prospect.engine import checkpoint as ckpt
from prospect.engine.metrics import MetricsLog, StepStats, format_line
from prospect.engine.rundir import RunDir
from prospect.errors import UserError
from prospect.evaluation.heldout import HeldOutResult, evaluate, print_report
from prospect.evaluation.judges import get_judge
from prospect.evaluation.rewards import RewardEval, evaluate_rewards, score_in_batches
from prospect.losses.base import LossInputs, get_loss
from prospect.models.attention import attention_cost, unwrapped, uses_segments
from prospect.models.loading import load_model
from prospect.models.reference import (
    AdapterReference,
    FrozenReference,
    ReferenceCache,
    frozen_copy,
    refresh_copy,
    resolve_reference_mode,
    store_linears_in_bf16,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from prospect.models.reward import ScalarScorer, last_token_positions, load_reward_model
from prospect.models.scoring import TokenScorer

log = logging.getLogger(__name__)
SHARDED_STATE = "sharded"  # FSDP / DeepSpeed checkpoints: accelerate's own per-rank state


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float]


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def cpu_only() -> bool:
    """No accelerator: every process runs on the CPU and multi-process launches are DDP over gloo."""
    if torch.accelerator.is_available():
        return False
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(variable, "").lower() == "true":
            log.warning("%s needs GPUs; with none here the processes run DDP over gloo on the CPU", name)
    return True


class Trainer:
    def __init__(self, config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None):
        self.cfg, t = config, config.train
        self.callbacks = callbacks or []
        self.spec = get_loss(config.loss_name)
        self.params = self.spec.make_params(config.loss, f"{config.source}: loss")
        self.check_options()
        # With no GPU, multi-process launches (torchrun, accelerate launch) run DDP over gloo on the CPU.
        self.accelerator = Accelerator(log_with=self.trackers(), project_dir=t.output_dir, cpu=cpu_only())
        if self.sharded() and config.model.lora_r > 0:
            raise UserError(
                "model.lora_r: LoRA under FSDP or DeepSpeed is not supported; launch LoRA runs with "
                "configs/accelerate/ddp.yaml (the adapter is small enough to replicate)"
            )
        self.run = RunDir(config)
        self.run_dir = self.run.path
        examples = read_training(config.data, self.spec.data, t.seed)
        self.warnings: list[str] = []
        if self.spec.check_data:
            self.params, self.warnings = self.spec.check_data(self.params, count(examples))
        for warning in self.warnings:
            log.warning(warning)

        if t.threads > 0:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(t.seed)
        self.device = self.accelerator.device
        self.bf16 = t.precision == "bf16" or (t.precision == "auto" and bf16_supported(self.device))
        if t.precision == "bf16" and not bf16_supported(self.device):
            log.warning("bf16 requested but %s has no fast bf16 matmuls; it will be slow", self.device)
        self.reward_model = self.spec.model == "reward"
        model, self.tokenizer = (load_reward_model if self.reward_model else load_model)(config.model)
        self.control_ids = self.add_control_tokens(model)
        self.encoder = Encoder(
            self.tokenizer,
            config.data.max_length,
            config.data.max_prompt_length,
            config.data.truncation,
            prompt_suffix=self.control_ids,
        )
        self.data = encode_all(examples, self.encoder, prompts_only=self.spec.data == "prompts")
        self.world = self.accelerator.num_processes
        self.global_batch = t.batch_size * t.grad_accum * self.world
        per_epoch = len(self.data.items) // self.global_batch
        if per_epoch == 0:
            raise UserError(
                f"{config.data.train}: {len(self.data.items)} training items, fewer than one global batch "
                f"(batch_size {t.batch_size} x grad_accum {t.grad_accum} x {self.world} processes)"
            )
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))

        if self.accelerator.is_main_process:
            self.run.create()
        self.accelerator.wait_for_everyone()
        self.model, self.peft_model = self.build_policy(model)
        self.scorer = self.build_scorer()
        trainable = [p for p in self.scorer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True
        )
        updates = self.total_steps * self.updates_per_step()
        self.scheduler = get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=round(t.warmup_ratio * updates),
            num_training_steps=updates,
        )
        self.policy, self.optimizer = self.accelerator.prepare(self.scorer, self.optimizer)
        self.live_reference = self.build_reference()
        self.reference_forwards = 0  # sequences the reference model actually ran (0 when fully cached)
        self.reference = self.counted(self.live_reference) if self.live_reference else None
        self.cache: ReferenceCache | None = None
        self.step = 0

    # ----- set-up -------------------------------------------------------------------------------
    def check_options(self) -> None:
        t, m = self.cfg.train, self.cfg.model
        if self.spec.needs_kl_batch and t.batch_size < 2:
            raise UserError(
                f"train.batch_size={t.batch_size}: loss '{self.spec.name}' pairs each prompt with another "
                "example's completion for its KL estimate, so it needs a batch size of at least 2"
            )
        for name in ("batch_size", "grad_accum"):
            if getattr(t, name) < 1:
                raise UserError(f"train.{name}: expected at least 1, got {getattr(t, name)}")
        if t.reference_refresh_every and (m.lora_r > 0 or t.reference_cache):
            raise UserError(
                "train.reference_refresh_every needs full fine-tuning with train.reference_cache=false "
                "(a refreshed reference cannot be the adapter-disabled model or a precomputed cache)"
            )
        if t.reference_cache and not self.spec.needs_reference:
            raise UserError(f"train.reference_cache: loss '{self.spec.name}' uses no reference model")
        if t.reference_model and (m.lora_r > 0 or t.reference == "adapter"):
            raise UserError("train.reference_model needs train.reference=copy without LoRA")
        if not 0 < t.reference_refresh_alpha <= 1:
            raise UserError(
                f"train.reference_refresh_alpha={t.reference_refresh_alpha}: expected a value in (0, 1]"
            )

    def trackers(self) -> list[str] | None:
        names = [n.strip() for n in self.cfg.train.report_to.split(",") if n.strip() and n.strip() != "none"]
        return names or None

    def add_control_tokens(self, model: torch.nn.Module) -> dict[bool, list[int]] | None:
        """CSFT: add <|good|>/<|bad|> as special tokens; they end each prompt according to its label."""
        if not self.spec.control_tokens:
            return None
        good, bad = self.spec.control_tokens
        self.tokenizer.add_special_tokens({"additional_special_tokens": [good, bad]})
        model.resize_token_embeddings(len(self.tokenizer))
        return {
            True: [self.tokenizer.convert_tokens_to_ids(good)],
            False: [self.tokenizer.convert_tokens_to_ids(bad)],
        }

    def build_policy(self, model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
        m = self.cfg.model
        if self.cfg.train.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference_mode = resolve_reference_mode(self.cfg.train.reference, m.lora_r > 0)
        samples = (
            self.cfg.eval.num_prompts > 0 and self.spec.model == "policy"
        )  # held-out KL needs a reference
        wants_reference = self.spec.needs_reference or samples
        self.initial_model = None
        if self.reference_mode == "copy" and wants_reference:
            source = self.cfg.train.reference_model
            other = load_model(dataclasses.replace(m, name=source))[0] if source else model
            self.initial_model = frozen_copy(other)
        if m.lora_r <= 0:
            return model, None
        from peft import LoraConfig, get_peft_model

        targets = m.lora_target_modules
        lora = LoraConfig(
            r=m.lora_r,
            lora_alpha=m.lora_alpha,
            lora_dropout=m.lora_dropout,
            task_type="SEQ_CLS" if self.spec.model == "reward" else "CAUSAL_LM",
            target_modules=targets if targets == "all-linear" else [s.strip() for s in targets.split(",")],
        )
        peft_model = get_peft_model(model, lora)
        return peft_model, peft_model

    def build_scorer(self) -> torch.nn.Module:
        """The module accelerate wraps: log-probs of a policy, or scores of a reward model."""
        if self.reward_model:
            base = self.model.get_base_model() if self.peft_model is not None else self.model
            return ScalarScorer(self.model, base.score, bf16=self.bf16)
        return TokenScorer(self.model, bf16=self.bf16, chunk=self.cfg.train.logprob_chunk)

    def updates_per_step(self) -> int:
        """Optimizer updates in one engine step (PPO makes several per rollout)."""
        return 1

    def extra_state(self) -> dict:
        """Loop state beyond weights, optimizer and RNG that a checkpoint must keep (PPO's KL coefficient)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def build_reference(self) -> FrozenReference | None:
        """The live reference: for the loss, and for the held-out KL of any loss."""
        if self.reference_mode == "adapter":
            return AdapterReference(self.policy_token_logps, self.peft_model)
        if self.initial_model is None:
            return None
        self.initial_model.to(self.device)
        if self.bf16 and not self.cfg.train.reference_refresh_every:  # a refreshed copy must stay fp32
            store_linears_in_bf16(self.initial_model)
        return FrozenReference(self.initial_model, self.bf16, self.cfg.train.logprob_chunk)

    def counted(self, reference: Callable[[Sequences], torch.Tensor]) -> Callable[[Sequences], torch.Tensor]:
        def run(seqs: Sequences) -> torch.Tensor:
            self.reference_forwards += seqs.num_sequences
            return reference(seqs)

        return run

    # ----- reference cache ----------------------------------------------------------------------
    def planned_microbatches(self) -> Iterator[tuple[int, list[int]]]:
        """(process rank, example indices) of every microbatch from this step to the end of the run."""
        t = self.cfg.train
        for step in range(self.step, self.total_steps):
            indices = step_indices(len(self.data.items), self.global_batch, t.seed, step)
            for micro in range(t.grad_accum):
                for rank in range(self.world):
                    yield rank, microbatch_slice(indices, micro, rank, self.world, t.batch_size)

    def planned_sequences(self) -> Iterator[tuple[bytes, list[int], list[int]]]:
        """Every sequence the reference will be asked about from this step to the end of the run, on every
        process, in the run's own batch order (so KTO's mismatched pairs are exactly the ones trained on)."""
        for _, indices in self.planned_microbatches():
            items = [self.data.items[i] for i in indices]
            if self.spec.data == "paired":
                pairs = [(it.prompt_ids, c) for it in items for c in (it.chosen_ids, it.rejected_ids)]
            else:
                pairs = [(it.prompt_ids, it.completion_ids) for it in items]
                if self.spec.needs_kl_batch:
                    pairs += [(m.prompt_ids, m.completion_ids) for m in mismatched(items, self.encoder.fit)]
            for prompt, completion in pairs:
                yield sequence_key(prompt, completion), prompt, completion

    def planned_batches(self, rank: int) -> Iterator[Sequences]:
        """The sequences of each microbatch process `rank` will train on, laid out as in training."""
        for owner, indices in self.planned_microbatches():
            if owner == rank:
                batch = self.make_batch(indices)
                yield from (s for s in (batch.sequences, batch.kl_sequences) if s is not None)

    def reference_fingerprint(self) -> str:
        """What the reference log-probs depend on: weights, tokenizer, truncation, precision, attention, and
        in bf16 the packing (see ReferenceCache)."""
        model = self.initial_model if self.initial_model is not None else self.peft_model
        packing = []
        if self.cache_by_layout:
            packing = ["shared" if self.prompt_sharing_cost is not None else "packed"]
        return "-".join(
            [
                weights_fingerprint(model)[:16],
                tokenizer_fingerprint(self.tokenizer)[:8],
                f"len{self.cfg.data.max_length}p{self.cfg.data.max_prompt_length}",
                "bf16" if self.bf16 else "fp32",
                str(getattr(unwrapped(model).config, "_attn_implementation", "")),
                *packing,
            ]
        )

    @property
    def cache_by_layout(self) -> bool:
        """In bf16 a packed sequence's log-prob depends on where it sits in its row."""
        return self.bf16 and self.cfg.train.padding_free

    def precompute_reference(self) -> None:
        """Fill the on-disk cache with every reference log-prob the run needs; then serve from it."""
        cache = ReferenceCache(self.reference_fingerprint(), by_layout=self.cache_by_layout)
        acc = self.accelerator
        show = acc.is_main_process and sys.stderr.isatty()
        before = dict(cache.table)
        if cache.by_layout:  # each process runs its own microbatches, exactly as it will train on them
            per_microbatch = 2 if self.spec.needs_kl_batch else 1  # KTO: the target and the KL batch
            count = (self.total_steps - self.step) * self.cfg.train.grad_accum * per_microbatch
            bar = tqdm(total=count, desc="reference log-probs (batches)", disable=not show)
            cache.fill_batches(self.planned_batches(acc.process_index), self.reference, progress=bar.update)
        else:  # every sequence once, length-sorted, shared out among processes
            missing = cache.missing(self.planned_sequences())
            mine = missing[acc.process_index :: self.world]
            bar = tqdm(total=len(mine), desc="reference log-probs", disable=not show)
            cache.fill(mine, self.reference, self.tokenizer.pad_token_id, self.device, progress=bar.update)
        bar.close()
        new = [(k, v) for k, v in cache.table.items() if k not in before]
        if self.world > 1:
            new = gather_object(new)
        cache.table.update(new)
        if acc.is_main_process:
            print(f"reference cache {cache.path.name}: {len(before)} known, {len(new)} computed", flush=True)
            if new:
                cache.save()
        acc.wait_for_everyone()
        self.cache = cache
        self.reference = cache.lookup

    def release_reference_copy(self) -> None:
        """Once the cache answers for the loss, a frozen copy is kept only for the held-out KL."""
        if self.cfg.eval.num_prompts > 0 or self.initial_model is None:
            return
        self.initial_model = self.live_reference = None
        gc.collect()

    # ----- the loop -----------------------------------------------------------------------------
    def policy_token_logps(self, seqs: Sequences) -> torch.Tensor:
        """Through the wrapped module, so DDP/FSDP see every forward."""
        input_ids, attention_mask, position_ids, layout = seqs.model_inputs()
        return self.policy(input_ids, attention_mask, seqs.completion_mask, position_ids, layout)

    def policy_logps(self, seqs: Sequences) -> torch.Tensor:
        return seqs.per_sequence(self.policy_token_logps(seqs))

    def make_batch(self, indices: list[int]) -> Batch:
        items = [self.data.items[i] for i in indices]
        build = self.build_sequences
        pad_id = self.tokenizer.pad_token_id
        if self.spec.data == "paired":
            return paired_batch(items, pad_id, build).to(self.device)
        if self.spec.data == "ranked":
            return group_batch(items, pad_id, build).to(self.device)
        if self.spec.data == "rated":
            return rated_batch(items, pad_id, build).to(self.device)
        kl_fit = self.encoder.fit if self.spec.needs_kl_batch else None
        return unpaired_batch(items, pad_id, kl_fit, build).to(self.device)

    @functools.cached_property
    def prompt_sharing_cost(self) -> float | None:
        """The attention cost that plans shared prompts, or None when prompts are not shared."""
        if self.cfg.train.share_prompts and uses_segments(self.model):
            return attention_cost(self.model)
        return None

    def build_sequences(
        self, prompts: list[list[int]], completions: list[list[int]], pad_id: int
    ) -> Sequences:
        if not self.cfg.train.padding_free:
            return pad(prompts, completions, pad_id)
        cost = self.prompt_sharing_cost
        return pack(prompts, completions, pad_id, share_prompts=cost is not None, attention_cost=cost or 0.0)

    def units(self, batch: Batch) -> int:
        return batch.units if self.spec.normalize == "units" else batch.sequences.completion_tokens

    def kl_estimate(self, batch: Batch) -> torch.Tensor:
        """Mean log pi/pi_ref over the mismatched pairs of this microbatch on all processes (no gradient)."""
        with torch.no_grad():
            ratios = self.policy_logps(batch.kl_sequences) - self.reference(batch.kl_sequences)
            total = torch.stack([ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device)])
            total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).detach()

    def reward_scores(self, seqs: Sequences) -> torch.Tensor:
        """One score per sequence, at its last non-pad token (as transformers' classifiers read it)."""
        positions = last_token_positions(seqs, self.tokenizer.pad_token_id)
        return self.policy(*seqs.model_inputs()).flatten()[positions]

    def microbatch_loss(self, batch: Batch, stats: StepStats) -> torch.Tensor:
        seqs = batch.sequences
        if self.reward_model:
            inputs = LossInputs(
                scores=self.reward_scores(seqs),
                completion_lengths=seqs.completion_lengths(),
                group_index=batch.group_index,
                targets=batch.targets,
            )
        else:
            # No-grad passes first, so the wrapped policy's grad-enabled forward is the last before backward.
            reference = self.reference(seqs) if self.spec.needs_reference else None
            kl = self.kl_estimate(batch) if self.spec.needs_kl_batch else None
            inputs = LossInputs(
                policy_logps=self.policy_logps(seqs),
                completion_lengths=seqs.completion_lengths(),
                reference_logps=reference,
                labels=batch.labels,
                kl_estimate=kl,
            )
        out = self.spec.compute(inputs, self.params)
        stats.add_mean("loss", out.losses.detach().sum(), float(self.units(batch)))
        if inputs.kl_estimate is not None:
            stats.add_mean("kl", inputs.kl_estimate, 1.0)
        for name, (total, n) in out.means.items():
            stats.add_mean(name, total, n)
        for name, value in out.totals.items():
            stats.add_total(name, value)
        stats.add_total("tokens", float(seqs.tokens))
        return out.losses.sum()

    def accumulate_gradients(self) -> tuple[dict[str, float], list[Batch]]:
        """Forward and backward over this step's microbatches; gradients are left in `.grad`."""
        t = self.cfg.train
        self.policy.train()  # sampling for evaluation leaves it in eval mode (no checkpointing, no dropout)
        indices = step_indices(len(self.data.items), self.global_batch, t.seed, self.step)
        rank = self.accelerator.process_index
        batches = [
            self.make_batch(microbatch_slice(indices, m, rank, self.world, t.batch_size))
            for m in range(t.grad_accum)
        ]
        # Normalise by the units of the whole step on all processes; DDP averages over processes, hence * world.
        units = self.accelerator.reduce(
            torch.tensor(float(sum(map(self.units, batches))), device=self.device), "sum"
        )
        stats = StepStats()
        for m, batch in enumerate(batches):
            sync = (
                contextlib.nullcontext() if m == len(batches) - 1 else self.accelerator.no_sync(self.policy)
            )
            with sync:
                loss = self.microbatch_loss(batch, stats) * self.world / units
                self.accelerator.backward(loss)
        metrics = stats.reduce(lambda x: self.accelerator.reduce(x.to(self.device), "sum").cpu())
        return metrics, batches

    def train_step(self) -> dict[str, float]:
        metrics, batches = self.accumulate_gradients()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else float("inf")
        metrics["grad_norm"] = float(self.accelerator.clip_grad_norm_(params, max_norm))
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
            where = "; ".join(sorted({loc for b in batches for loc in b.locations}))[:800]
            message = (
                f"step {self.step + 1}: non-finite loss ({metrics['loss']}) or gradient norm "
                f"({metrics['grad_norm']}); examples: {where}"
            )
            self.optimizer.zero_grad(set_to_none=True)
            if self.cfg.train.on_nonfinite == "stop":
                raise UserError(
                    message + ". The last checkpoint is intact; train.on_nonfinite=skip skips such steps."
                )
            log.warning("%s; step skipped (no update)", message)
            metrics["skipped"] = 1.0
            return metrics
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def maybe_refresh_reference(self) -> None:
        every = self.cfg.train.reference_refresh_every
        if every and self.step % every == 0:
            policy = self.accelerator.unwrap_model(self.policy).model
            refresh_copy(self.initial_model, policy, self.cfg.train.reference_refresh_alpha)

    def train(self) -> Path:
        t, started = self.cfg.train, time.perf_counter()
        is_main = self.accelerator.is_main_process
        if self.run.resuming:
            self.resume()
        metrics_log = MetricsLog(
            self.run_dir / "metrics.jsonl", resume_step=self.step if self.run.resuming else None
        )
        if self.trackers():
            self.accelerator.init_trackers(self.run_dir.name, config=flatten(self.cfg.to_dict()))
        before = (
            self.evaluate_heldout("before")
            if self.cfg.eval.num_prompts > 0 and self.cfg.eval.before
            else None
        )
        if t.reference_cache:
            self.precompute_reference()
            self.release_reference_copy()
        self.print_banner()
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="training",
            dynamic_ncols=True,
            disable=not (is_main and sys.stderr.isatty()),
        )
        first_step, loop_started = self.step, time.perf_counter()
        while self.step < self.total_steps:
            step_started = time.perf_counter()
            ckpt.fault("step", self.step + 1)
            metrics = self.train_step()
            self.step += 1
            self.maybe_refresh_reference()
            metrics["tokens_per_s"] = metrics.pop("tokens") / (time.perf_counter() - step_started)
            if is_main:
                metrics_log.write({"step": self.step, **metrics})
                if self.step % max(1, t.log_every) == 0 or self.step == self.total_steps:
                    eta = (
                        (time.perf_counter() - loop_started)
                        / (self.step - first_step)
                        * (self.total_steps - self.step)
                    )
                    bar.write(
                        format_line(self.step, self.total_steps, metrics) + f" | eta {eta / 60:.1f} min"
                    )
                bar.update(1)
            if self.trackers():
                self.accelerator.log(metrics, step=self.step)
            if (t.save_every and self.step % t.save_every == 0) or self.step == self.total_steps:
                self.save_checkpoint()
            for callback in self.callbacks:
                callback(self, StepResult(self.step, metrics))
        bar.close()
        final = self.save_final_model()
        after = self.evaluate_heldout("after") if self.cfg.eval.num_prompts > 0 else None
        if before and after and is_main and not self.reward_model:
            print_report(before, after, self.run_dir / "report.json")
        if self.trackers():
            self.accelerator.end_training()
        if is_main:
            print(f"done in {time.perf_counter() - started:.0f}s; model: {final}", flush=True)
        return final

    def sharded(self) -> bool:
        return self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    def strategy(self) -> str:
        kind = self.accelerator.distributed_type
        return "" if kind == DistributedType.NO else f" {kind.value}"

    def print_banner(self) -> None:
        if not self.accelerator.is_main_process:
            return
        t = self.cfg.train
        mode = f"LoRA r={self.cfg.model.lora_r}" if self.peft_model is not None else "full fine-tuning"
        reference = "none"
        if self.spec.needs_reference:
            reference = self.reference_mode + (" (cached)" if self.cache else "")
        print(
            f"prospect {self.spec.name}: {len(self.data.items)} items {self.data.counts}, {self.total_steps} steps "
            f"of {self.global_batch} ({t.batch_size} x {t.grad_accum} accum x {self.world} proc{self.strategy()}), {mode}, "
            f"reference={reference}, precision={'bf16 autocast + fp32 log-softmax' if self.bf16 else 'fp32'}"
            f"{', padding-free' if t.padding_free else ''}, run dir {self.run_dir}",
            flush=True,
        )

    # ----- evaluation ---------------------------------------------------------------------------
    def evaluate_heldout(self, when: str) -> HeldOutResult | RewardEval | None:
        """Before/after comparison on held-out data; saved to eval_<when>.json (reused on resume)."""
        path = self.run_dir / f"eval_{when}.json"
        kind = RewardEval if self.reward_model else HeldOutResult
        if when == "before" and self.step > 0:  # resumed: the untrained model is gone
            return kind(**json.loads(path.read_text())) if path.is_file() else None
        result = self.evaluate_reward_model(when) if self.reward_model else self.evaluate_samples(when)
        if self.accelerator.is_main_process:
            ckpt.write_text_atomic(path, json.dumps(result.__dict__, indent=1))
        return result

    def evaluate_reward_model(self, when: str) -> RewardEval:
        scorer = self.accelerator.unwrap_model(self.policy)
        pad_id = self.tokenizer.pad_token_id

        def score(prompts: list[list[int]], completions: list[list[int]]) -> list[float]:
            return score_in_batches(
                lambda seqs: scorer.sequence_scores(seqs, pad_id), prompts, completions, pad_id, self.device
            )

        # Bradley-Terry scores have no natural zero: sign accuracy splits at the mean training score.
        threshold = 0.0
        if self.spec.data == "ranked":
            pairs = [(g.prompt_ids, c) for g in self.data.items[:256] for c in g.completions]
            threshold = statistics.fmean(score([p for p, _ in pairs], [c for _, c in pairs]))
        result = evaluate_rewards(
            score,
            self.encoder,
            self.cfg.data,
            get_judge(self.cfg.eval.judge),
            threshold,
            self.cfg.eval.num_prompts,
            self.cfg.train.seed,
        )
        if self.accelerator.is_main_process:
            judge = self.cfg.eval.judge
            print(f"{when}: {'':24}{'model':>8}{judge if judge != 'none' else '':>8}", flush=True)
            for name, model_value, judge_value in result.rows():
                if model_value is not None:
                    shown = f"{judge_value:>8.3f}" if judge_value is not None else ""
                    print(f"  {name:28}{model_value:>8.3f}{shown}", flush=True)
        return result

    def evaluate_samples(self, when: str) -> HeldOutResult:
        e = self.cfg.eval
        prompts = load_eval_prompts(self.cfg.data, self.encoder, e.num_prompts)
        if self.control_ids:  # CSFT samples with the desirable control token
            prompts = [
                dataclasses.replace(p, prompt_ids=p.prompt_ids + self.control_ids[True]) for p in prompts
            ]
        unwrapped = self.accelerator.unwrap_model(self.policy)
        is_main = self.accelerator.is_main_process
        if is_main:
            print(f"evaluating {when} training on {len(prompts)} held-out prompts ...", flush=True)
        return evaluate(
            unwrapped.model,
            self.tokenizer,
            prompts,
            unwrapped.sequence_logps,
            self.live_reference,
            get_judge(e.judge, self.cfg.online, self.device, self.bf16),
            e,
            seed=self.cfg.train.seed,
            bf16=self.bf16,
            verbose=is_main,
            label=when,
        )

    # ----- checkpoints --------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def raw_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer

    def save_checkpoint(self) -> Path | None:
        root, acc = self.checkpoint_root(), self.accelerator
        tmp = root / f".{ckpt.step_dir_name(self.step)}.tmp"
        if acc.is_main_process:
            tmp = ckpt.temporary_dir(root, self.step)
        acc.wait_for_everyone()
        if self.sharded():  # every rank writes its shard of weights and optimizer state
            acc.save_state(str(tmp / SHARDED_STATE), safe_serialization=True)
        if acc.is_main_process:
            if not self.sharded():
                ckpt.save_weights(acc.unwrap_model(self.policy), tmp / "model.safetensors")
                ckpt.save_optimizer(self.raw_optimizer(), tmp)
            ckpt.fault("checkpoint-write", self.step)
            if self.cfg.train.reference_refresh_every:
                ckpt.save_weights(self.initial_model, tmp / "reference.safetensors", trainable_only=False)
            ckpt.write_json(tmp / "scheduler.json", self.scheduler.state_dict())
        acc.wait_for_everyone()
        ckpt.save_rng(tmp / f"rng-{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "world_size": self.world,
                "extra": self.extra_state(),
            }
            ckpt.write_json(tmp / ckpt.STATE_FILE, state)
            final = ckpt.commit(tmp, root, self.step, self.cfg.train.keep_last)
        acc.wait_for_everyone()
        return final

    def resume(self) -> Path | None:
        found = ckpt.complete_checkpoints(self.checkpoint_root())
        if not found:
            log.warning("%s: no complete checkpoint yet; starting from step 0", self.run_dir)
            return None
        step, path = found[-1]
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        if state["world_size"] != self.world:
            raise UserError(
                f"{path}: written by {state['world_size']} processes; resume with the same number"
            )
        if self.sharded():
            self.accelerator.load_state(str(path / SHARDED_STATE))
        else:
            ckpt.load_weights(self.accelerator.unwrap_model(self.policy), path / "model.safetensors")
            ckpt.load_optimizer(self.raw_optimizer(), path)
        if self.cfg.train.reference_refresh_every:
            ckpt.load_weights(self.initial_model, path / "reference.safetensors", trainable_only=False)
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        ckpt.load_rng(path / f"rng-{self.accelerator.process_index}.safetensors")
        self.load_extra_state(state.get("extra", {}))
        self.step = step
        if self.accelerator.is_main_process:
            print(f"resumed from {path} (step {step} of {self.total_steps})", flush=True)
        return path

    def save_final_model(self) -> Path:
        """A plain transformers checkpoint (config, safetensors, tokenizer with chat template); LoRA is merged."""
        final = self.run_dir / "final"
        acc = self.accelerator
        # FSDP and ZeRO-3 hold shards: gather the full weights (a collective, so on every rank).
        full = acc.get_state_dict(self.policy) if self.sharded() else None
        if acc.is_main_process:
            model = acc.unwrap_model(self.policy).model
            tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=self.run_dir))
            if self.peft_model is not None:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{s}.{k}": v for s, values in config.items() for k, v in values.items()}
