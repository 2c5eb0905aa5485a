"""The one training loop: a loss declares what it needs; this loop computes it, normalises it over the whole
optimizer step, and runs it on every device accelerate gives it. Read top to bottom: set-up, `train`, then one
step (`train_step` -> `accumulate_gradients` -> `microbatch_loss` -> `optimizer_step`). Collaborators own the
rest: the start every trainer shares (`run_start.py`), the head (`heads.py`), the reference plan
(`reference_plan.py`), the checkpointer (`checkpoint.py`), the held-out evaluations before, during and after
training and the ETA (`periodic_eval.py`, `evaluation/`)."""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from transformers import PreTrainedModel, get_scheduler

from prospect.config import Config
from prospect.data.batching import Batch, Sequences, pad
from prospect.data.packing import pack
from prospect.data.pipeline import count, encode_all, read_training
from prospect.data.shapes import make_batch
from prospect.data.splits import evaluates
from prospect.data.tokenize import Encoder
from prospect.engine import checkpoint as ckpt
from prospect.engine.heads import HEADS, RunContext
from prospect.engine.launch import accumulating, configure_torch
from prospect.engine.metrics import MetricsLog, StepStats, format_line
from prospect.engine.periodic_eval import Evaluations
from prospect.engine.publish import finish_run
from prospect.engine.reference_plan import BatchOrder, ReferencePlan, reference_fingerprint
from prospect.engine.run_start import RunStart
from prospect.engine.sharding import full, gathered, prepare, shard
from prospect.errors import UserError
from prospect.losses.base import LossOutput
from prospect.models.attention import attention_cost, uses_segments
from prospect.models.loading import load_model, prepare_for_training, with_lora
from prospect.models.precision import use_bf16, warn_of_bf16_ties
from prospect.models.reference import (
    AdapterReference,
    FrozenReference,
    ReferenceCache,
    frozen_copy,
    refresh_copy,
    resolve_reference_mode,
    store_linears_in_bf16,
)
from prospect.progress import Progress, duration

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    step: int
    metrics: dict[str, float]


class Trainer(RunStart):
    throughput_unit = "tokens"  # what the metric `<unit>_per_s` counts (a step's metrics hold the total)

    def __init__(self, config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None):
        t = config.train
        self.open_run(config, callbacks)
        self.head = HEADS[self.spec.model]
        examples = read_training(config.data, self.spec.data, t.seed, evaluates(config.eval))
        self.warnings: list[str] = []
        if self.spec.check_data:
            self.params, self.warnings = self.spec.check_data(self.params, count(examples))
        for warning in self.warnings:
            log.warning(warning)

        configure_torch(t)
        self.device = self.accelerator.device
        self.bf16 = use_bf16(t.precision, self.device)
        model, self.tokenizer = self.head.load(config.model)
        if self.bf16:
            warn_of_bf16_ties(model)
        tokens = self.spec.prompt_tokens
        self.prompt_suffix = tokens.install(self.tokenizer, model) if tokens else None
        self.encoder = Encoder(
            self.tokenizer,
            config.data.max_length,
            config.data.max_prompt_length,
            config.data.truncation,
            prompt_suffix=self.prompt_suffix,
        )
        self.data = encode_all(examples, self.encoder, prompts_only=self.spec.data == "prompts")
        self.world = self.accelerator.num_processes
        self.order = BatchOrder(len(self.data.items), t.seed, t.batch_size, t.grad_accum, self.world)
        self.global_batch = self.order.global_batch
        self.total_steps = self.order.total_steps(t.max_steps, t.epochs, config.data.train)

        self.model, self.peft_model = self.build_policy(model)
        self.scorer = self.build_scorer()
        if self.fsdp_on_cpu:  # before the optimizer is built, so that it holds the shards
            shard(self.scorer)
        self.build_optimizer(self.scorer)
        self.live_reference = self.build_reference()
        self.reference_forwards = 0  # sequences the reference model actually ran (0 when fully cached)
        self.reference = self.counted(self.live_reference) if self.live_reference else None
        self.cache: ReferenceCache | None = None
        self.plan = ReferencePlan(
            self.order,
            self.data.items,
            self.spec.data,
            self.spec.reference_point,
            self.encoder,
            self.make_batch,
        )
        self.checkpointer = ckpt.Checkpointer(
            self.accelerator,
            self.run_dir,
            self.policy,
            self.optimizer,
            self.scheduler,
            self.tokenizer,
            t.keep_last,
            self.sharded,
            lora=self.peft_model is not None,
            refreshed_reference=self.initial_model if t.reference_refresh_every else None,
            loop_state=self.loop_state,
            load_loop_state=self.load_loop_state,
        )
        self.evaluation = self.head.evaluation(
            config,
            self.spec,
            RunContext(
                self.encoder,
                self.tokenizer,
                self.data.items,
                self.device,
                self.bf16,
                self.prompt_suffix[True] if self.prompt_suffix else None,
                self.accelerator.is_main_process,
            ),
        )
        self.evals = Evaluations(
            config, self.spec, self.encoder, self.run_dir, self.accelerator.is_main_process
        )
        self.create_run()

    # ----- set-up -------------------------------------------------------------------------------
    def build_optimizer(self, module: torch.nn.Module) -> None:
        """AdamW on `module`'s trainable weights and its learning-rate schedule; accelerate wraps all three."""
        t = self.cfg.train
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay, fused=True)
        updates = self.total_steps * self.updates_per_step()
        warmup = round(t.warmup_ratio * updates)
        self.scheduler = get_scheduler(t.lr_scheduler, optimizer, warmup, num_training_steps=updates)
        self.policy, self.optimizer = prepare(self.accelerator, module, optimizer)

    def build_policy(self, model: PreTrainedModel) -> tuple[torch.nn.Module, Any]:
        """(the trained model, its PEFT wrapper or None); keeps a frozen copy for the reference first."""
        m = self.cfg.model
        prepare_for_training(model, self.cfg.train.disable_dropout, m.gradient_checkpointing)
        self.reference_mode = resolve_reference_mode(self.cfg.train.reference, m.lora_r > 0)
        samples = self.cfg.eval.num_prompts > 0 and self.head.samples_for_evaluation  # held-out KL
        self.initial_model = None
        if self.reference_mode == "copy" and (self.spec.needs_reference or samples):
            source = self.cfg.train.reference_model
            other = load_model(dataclasses.replace(m, name=source))[0] if source else model
            self.initial_model = frozen_copy(other)
        if m.lora_r <= 0:
            return model, None
        peft_model = with_lora(model, m, self.head.lora_task_type)
        return peft_model, peft_model

    def build_scorer(self) -> torch.nn.Module:
        """The module accelerate wraps: log-probs of a policy, or scores of a reward model."""
        return self.head.scorer(self.model, self.bf16, self.cfg.train.logprob_chunk)

    def updates_per_step(self) -> int:
        """Optimizer updates in one engine step (PPO makes several per rollout)."""
        return 1

    def loop_state(self) -> dict:
        """Loop state beyond weights, optimizer and RNG that a checkpoint must keep (skipped updates; PPO's KL
        coefficient)."""
        return {"skips": self.skips, "skips_in_a_row": self.skips_in_a_row, "evals": self.evals.state()}

    def load_loop_state(self, state: dict) -> None:
        self.skips, self.skips_in_a_row = state.get("skips", 0), state.get("skips_in_a_row", 0)
        self.evals.load_state(state.get("evals", {}))

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

    def reference_logps(self, seqs: Sequences) -> torch.Tensor:
        """Summed reference log-probs for the loss: from the live reference, or the cache once it is filled."""
        if self.reference is None:
            raise ValueError(f"loss '{self.spec.name}': no reference model was set up for this run")
        return self.reference(seqs)

    def counted(self, reference: Callable[[Sequences], torch.Tensor]) -> Callable[[Sequences], torch.Tensor]:
        def run(seqs: Sequences) -> torch.Tensor:
            self.reference_forwards += seqs.num_sequences
            return reference(seqs)

        return run

    @functools.cached_property
    def prompt_sharing_cost(self) -> float | None:
        """The attention cost that plans shared prompts, or None when prompts are not shared."""
        if self.cfg.train.share_prompts and uses_segments(self.model):
            return attention_cost(self.model)
        return None

    # ----- the reference cache ------------------------------------------------------------------
    def precompute_reference(self) -> None:
        """Fill the on-disk cache with every reference log-prob the rest of the run needs; serve from it."""
        by_layout = self.bf16 and self.cfg.train.padding_free  # a packed row's rounding depends on its layout
        packing = ("shared" if self.prompt_sharing_cost is not None else "packed") if by_layout else None
        model = self.initial_model if self.initial_model is not None else self.peft_model
        d, pad_id = self.cfg.data, self.tokenizer.pad_token_id
        key = reference_fingerprint(
            model, self.tokenizer, d.max_length, d.max_prompt_length, self.bf16, packing
        )
        cache, plan = ReferenceCache(key, by_layout=by_layout), self.plan
        self.cache = plan.precompute(
            cache, self.reference_logps, self.accelerator, self.step, self.total_steps, pad_id
        )
        self.reference = self.cache.lookup

    def release_reference_copy(self) -> None:
        """Once the cache answers for the loss, a frozen copy is kept only for the held-out KL and loss."""
        if not (self.cfg.eval.num_prompts or self.evals.items) and self.initial_model is not None:
            self.initial_model = self.live_reference = None
            gc.collect()

    # ----- the loop -----------------------------------------------------------------------------
    def train(self) -> Path:
        """Train, evaluate and save; a run that fails before its first step leaves no directory behind (and
        puts back the run it was overwriting)."""
        try:
            return self.train_and_evaluate()
        except BaseException:
            if self.step == 0 and self.accelerator.is_main_process:
                self.run.abandon()
            raise

    def train_and_evaluate(self) -> Path:
        t, started = self.cfg.train, time.perf_counter()
        is_main = self.accelerator.is_main_process
        if self.run.resuming:
            self.step = self.checkpointer.resume(self.total_steps)
        resumed_at = self.step if self.run.resuming else None
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=resumed_at)
        self.evals.start(resumed_at)
        if self.trackers():
            self.accelerator.init_trackers(self.run_dir.name, config=self.cfg.flat())
        evaluating = self.cfg.eval.num_prompts > 0
        before = self.evals.evaluate(self, "before") if evaluating and self.cfg.eval.before else None
        if t.reference_cache:
            self.precompute_reference()
            self.release_reference_copy()
        if is_main:
            print(self.banner(), flush=True)
        # The metric lines below report progress in a log file (percent=0); a terminal also gets a bar.
        bar = Progress("training", self.total_steps, "steps", show=is_main, percent=0, initial=self.step)
        while self.step < self.total_steps and not self.evals.stopped:
            step_started = time.perf_counter()
            ckpt.fault("step", self.step + 1)
            metrics = self.train_step()
            self.step += 1
            if is_main and self.run.set_aside:  # the overwritten run goes once the new one has a step
                self.run.settle()
            self.maybe_refresh_reference()
            unit = self.throughput_unit
            metrics[f"{unit}_per_s"] = metrics.pop(unit) / (time.perf_counter() - step_started)
            if is_main:
                metrics_log.write({"step": self.step, **metrics})
                bar.update(1)
                if self.step % max(1, t.log_every) == 0 or self.step == self.total_steps:
                    eta = self.evals.time_left(self.step, self.total_steps, bar, final=evaluating)
                    bar.write(format_line(self.step, self.total_steps, metrics) + f" | eta {eta}")
            if self.trackers():
                self.accelerator.log(metrics, step=self.step)
            stop = self.evals.after_step(self)  # evaluates when due, keeps best/, may stop early
            if stop or (t.save_every and self.step % t.save_every == 0) or self.step == self.total_steps:
                self.checkpointer.save(self.step, self.total_steps)
            for callback in self.callbacks:
                callback(self, StepResult(self.step, metrics))
        bar.close()
        final = self.checkpointer.save_final_model()
        after = self.evals.evaluate(self, "after") if evaluating else None
        if before and after:
            self.evaluation.report(before, after, self.run_dir / "report.json")
        if self.trackers():
            self.accelerator.end_training()
        if is_main:
            from prospect.report.page import write_run_report  # matplotlib: loaded when a report is written

            finish_run(self.run_dir, t, self.params, self.step)  # the model card; the push if asked
            # A reward model's evaluation prints its rows and writes no report.json.
            judged = before and after and self.head.samples_for_evaluation
            shown = ([self.run_dir / "report.json"] if judged else []) + (
                [write_run_report(self.run_dir)] if after else []  # report.html: curves, samples
            )
            report = f"; report: {' and '.join(map(str, shown))}" if shown else ""
            took = duration(time.perf_counter() - started)
            print(f"done in {took}; model: {final}{report}{self.evals.summary()}", flush=True)
        return final

    def train_step(self) -> dict[str, float]:
        metrics, batches = self.accumulate_gradients()
        lr = self.scheduler.get_last_lr()[0]
        locations = [loc for b in batches for loc in b.locations]
        metrics["grad_norm"], updated = self.optimizer_step(metrics["loss"], locations)
        metrics["lr"] = lr
        if not updated:
            metrics["skipped"] = 1.0
        return metrics

    def accumulate_gradients(self) -> tuple[dict[str, float], list[Batch]]:
        """Forward and backward over this step's microbatches; gradients are left in `.grad`."""
        self.policy.train()  # sampling for evaluation leaves it in eval mode (no checkpointing, no dropout)
        batches = [
            self.make_batch(m) for m in self.order.microbatches(self.step, self.accelerator.process_index)
        ]
        # Normalise by the units of the whole step on all processes; DDP averages over processes, hence * world.
        units = self.accelerator.reduce(
            torch.tensor(float(sum(map(self.units, batches))), device=self.device), "sum"
        )
        stats = StepStats()
        for m, batch in enumerate(batches):
            with accumulating(self.accelerator, self.policy, last=m == len(batches) - 1):
                loss = self.microbatch_loss(batch, stats) * self.world / units
                self.accelerator.backward(loss)
        metrics = stats.reduce(lambda x: self.accelerator.reduce(x.to(self.device), "sum").cpu())
        return metrics, batches

    def microbatch_loss(self, batch: Batch, stats: StepStats) -> torch.Tensor:
        # No-grad passes first, so the wrapped policy's grad-enabled forward is the last before backward.
        reference = self.reference_logps(batch.sequences) if self.spec.needs_reference else None
        point = self.estimate_reference_point(batch)
        inputs = self.head.inputs(self.policy, batch, self.tokenizer.pad_token_id, reference, point)
        out = self.spec.compute(inputs, self.params)
        reference_point = self.spec.reference_point
        if point is not None and reference_point is not None:  # a point is estimated only for such a spec
            stats.add_mean(reference_point.metric, point, 1.0)
        return self.record(out, stats, self.units(batch), float(batch.sequences.tokens))

    def record(self, out: LossOutput, stats: StepStats, units: int, processed: float) -> torch.Tensor:
        """The microbatch's loss, metrics and `processed` throughput units into `stats`; its summed loss."""
        stats.add_mean("loss", out.losses.detach().sum(), float(units))
        for name, (total, n) in out.means.items():
            stats.add_mean(name, total, n)
        for name, value in out.totals.items():
            stats.add_total(name, value)
        stats.add_total(self.throughput_unit, processed)
        return out.losses.sum()

    def optimizer_step(self, loss: float, locations: list[str]) -> tuple[float, bool]:
        """Clip, then step the optimizer and the schedule, unless the loss (the same on every process) or the
        gradient norm is not finite: then stop, or skip the update, as `train.on_nonfinite` says. Every
        trainer's updates go through here. Returns (gradient norm, whether the update was made)."""
        params = [p for p in self.policy.parameters() if p.requires_grad]
        max_norm = self.cfg.train.max_grad_norm if self.cfg.train.max_grad_norm > 0 else float("inf")
        grad_norm = float(full(self.accelerator.clip_grad_norm_(params, max_norm)))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            message = (
                f"step {self.step + 1}: non-finite loss ({loss}) or gradient norm ({grad_norm}); "
                f"examples: {'; '.join(sorted(set(locations)))[:800]}"
            )
            self.optimizer.zero_grad(set_to_none=True)
            t = self.cfg.train
            if t.on_nonfinite == "stop":
                raise UserError(
                    message + ". The last checkpoint is intact; train.on_nonfinite=skip skips such steps."
                )
            self.skips, self.skips_in_a_row = self.skips + 1, self.skips_in_a_row + 1
            for count, limit, name in (
                (self.skips_in_a_row, t.max_skips_in_a_row, "max_skips_in_a_row"),
                (self.skips, t.max_skips, "max_skips"),
            ):
                if limit and count > limit:
                    raise UserError(
                        f"{message}. {count} updates skipped, more than train.{name}={limit}; "
                        "the data or the learning rate needs a look. The last checkpoint is intact."
                    )
            log.warning("%s; update skipped", message)
            return grad_norm, False
        self.skips_in_a_row = 0
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, True

    # ----- what a step is made of ---------------------------------------------------------------
    def make_batch(self, indices: list[int]) -> Batch:
        return self.batch_of([self.data.items[i] for i in indices])

    def batch_of(self, items: list) -> Batch:
        """`items` in the loss's data shape, and its reference point's sequences."""
        pad_id = self.tokenizer.pad_token_id
        batch = make_batch(items, self.spec.data, pad_id, self.build_sequences)
        point = self.spec.reference_point
        if point is not None:
            extra = point.sequences(items, self.encoder.fit)
            batch.point_sequences = self.build_sequences(
                [e.prompt_ids for e in extra], [e.completion_ids for e in extra], pad_id
            )
        return batch.to(self.device)

    def build_sequences(
        self, prompts: list[list[int]], completions: list[list[int]], pad_id: int
    ) -> Sequences:
        if not self.cfg.train.padding_free:
            return pad(prompts, completions, pad_id)
        cost = self.prompt_sharing_cost
        return pack(prompts, completions, pad_id, share_prompts=cost is not None, attention_cost=cost or 0.0)

    def units(self, batch: Batch) -> int:
        return batch.units if self.spec.normalize == "units" else batch.sequences.completion_tokens

    def policy_token_logps(self, seqs: Sequences) -> torch.Tensor:
        """Through the wrapped module, so DDP/FSDP see every forward."""
        input_ids, attention_mask, position_ids, layout = seqs.model_inputs()
        return self.policy(input_ids, attention_mask, seqs.completion_mask, position_ids, layout)

    def estimate_reference_point(self, batch: Batch) -> torch.Tensor | None:
        """The loss's reference point on this microbatch's extra sequences, on all processes (no gradient)."""
        point = self.spec.reference_point
        if point is None or batch.point_sequences is None:
            return None
        seqs = batch.point_sequences
        with torch.no_grad():
            ratios = seqs.per_sequence(self.policy_token_logps(seqs)) - self.reference_logps(seqs)
            return point.estimate(ratios, lambda x: self.accelerator.reduce(x, reduction="sum"))

    def maybe_refresh_reference(self) -> None:
        every = self.cfg.train.reference_refresh_every
        if every and self.step % every == 0:
            if self.initial_model is None:
                raise ValueError("train.reference_refresh_every: there is no reference copy to refresh")
            policy = self.accelerator.unwrap_model(self.policy).model
            with gathered(self.policy):
                refresh_copy(self.initial_model, policy, self.cfg.train.reference_refresh_alpha)

    def banner(self) -> str:
        t, kind = self.cfg.train, self.accelerator.distributed_type
        mode = f"LoRA r={self.cfg.model.lora_r}" if self.peft_model else "full fine-tuning"
        reference = (
            self.reference_mode + (" (cached)" if self.cache else "") if self.spec.needs_reference else "none"
        )
        return (
            f"prospect {self.spec.name}: {len(self.data.items)} items {self.data.counts}, {self.total_steps} steps "
            f"of {self.global_batch} ({t.batch_size} x {t.grad_accum} accum x {self.world} proc"
            f"{'' if kind == DistributedType.NO else ' ' + ('FSDP2 on CPU' if self.fsdp_on_cpu else kind.value)}), {mode}, reference={reference}, precision="
            f"{'bf16 autocast + fp32 log-softmax' if self.bf16 else 'fp32'}"
            f"{', padding-free' if t.padding_free else ''}, run dir {self.run_dir}"
        )
