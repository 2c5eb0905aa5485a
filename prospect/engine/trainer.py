"""The one training loop. A loss declares what it needs; this loop computes it, normalises it over the
whole optimizer step, and handles devices (accelerate), precision, checkpoints and logging.

    trainer = Trainer(load_config("recipes/kto_vader.yaml"))
    trainer.train()
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from tqdm.auto import tqdm
from transformers import get_scheduler

from prospect import __version__
from prospect.config import Config
from prospect.data.batching import Batch, Sequences, microbatch_slice, step_indices, unpaired_batch
from prospect.data.pipeline import encode_examples, label_counts, load_eval_prompts, read_examples
from prospect.data.tokenize import Encoder
from prospect.engine import checkpoint as ckpt
from prospect.engine.metrics import MetricsLog, StepStats, format_line
from prospect.errors import UserError
from prospect.evaluation.heldout import HeldOutResult, evaluate
from prospect.evaluation.judges import get_judge
from prospect.losses.base import LossInputs, get_loss
from prospect.models.loading import load_model
from prospect.models.reference import adapter_reference, copy_reference, frozen_copy, resolve_reference_mode
from prospect.models.scoring import TokenScorer

log = logging.getLogger(__name__)
RUN_MARKER = "prospect-run.json"
# Options that may change when a run is resumed.
RESUMABLE_CHANGES = {
    ("train", "resume"),
    ("train", "overwrite"),
    ("train", "log_every"),
    ("train", "report_to"),
}


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


class Trainer:
    def __init__(self, config: Config, callbacks: list[Callable[[Trainer, StepResult], None]] | None = None):
        self.cfg = config
        self.callbacks = callbacks or []
        self.spec = get_loss(config.loss_name)
        self.params = self.spec.make_params(config.loss, f"{config.source}: loss")
        t = config.train
        if self.spec.needs_kl_batch and t.batch_size < 2:
            raise UserError(
                f"train.batch_size={t.batch_size}: loss '{self.spec.name}' pairs each prompt with another "
                "example's completion for its KL estimate, so it needs a batch size of at least 2"
            )
        for name in ("batch_size", "grad_accum"):
            if getattr(t, name) < 1:
                raise UserError(f"train.{name}: expected at least 1, got {getattr(t, name)}")
        self.run_dir = Path(t.output_dir)
        # With no GPU, multi-process launches (torchrun, accelerate launch) run DDP over gloo on the CPU.
        self.accelerator = Accelerator(
            log_with=self.trackers(), project_dir=str(self.run_dir), cpu=not torch.accelerator.is_available()
        )
        self.check_run_dir()
        examples = read_examples(config.data, self.spec.data, t.seed)
        counts = label_counts(examples)
        self.warnings = self.spec.check_data(self.params, counts) if self.spec.check_data else []
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
        model, self.tokenizer = load_model(config.model)
        self.encoder = Encoder(
            self.tokenizer, config.data.max_length, config.data.max_prompt_length, config.data.truncation
        )
        self.data = encode_examples(examples, self.encoder)

        self.world = self.accelerator.num_processes
        self.global_batch = t.batch_size * t.grad_accum * self.world
        per_epoch = len(self.data.items) // self.global_batch
        if per_epoch == 0:
            raise UserError(
                f"{config.data.train}: {len(self.data.items)} training examples, fewer than one global batch "
                f"(batch_size {t.batch_size} x grad_accum {t.grad_accum} x {self.world} processes)"
            )
        self.total_steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))

        self.create_run_dir()
        self.model, self.peft_model = self.build_policy(model)
        self.scorer = TokenScorer(self.model, bf16=self.bf16, chunk=t.logprob_chunk)
        trainable = [p for p in self.scorer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.scheduler = get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=round(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.policy, self.optimizer = self.accelerator.prepare(self.scorer, self.optimizer)
        self.reference = self.build_reference(model) if self.spec.needs_reference else None
        self.step = 0

    # ----- set-up -------------------------------------------------------------------------------
    def trackers(self) -> list[str] | None:
        names = [n.strip() for n in self.cfg.train.report_to.split(",") if n.strip() and n.strip() != "none"]
        return names or None

    def check_run_dir(self) -> None:
        """Never overwrite silently: an existing run needs --resume (continue) or --overwrite (replace)."""
        t, run = self.cfg.train, self.run_dir
        if t.resume and t.overwrite:
            raise UserError("train.resume and train.overwrite contradict each other; choose one")
        if run.exists() and not run.is_dir():
            raise UserError(f"{run}: exists and is not a directory; expected a run directory")
        self.run_exists = run.is_dir() and any(run.iterdir())
        if self.run_exists and not (t.resume or t.overwrite):
            raise UserError(
                f"{run}: run directory exists; pass --resume to continue it or --overwrite to replace it"
            )
        if self.run_exists and not (run / RUN_MARKER).is_file():
            action = "resume" if t.resume else "delete"
            raise UserError(f"{run}: not a prospect run directory (no {RUN_MARKER}); refusing to {action} it")
        if self.run_exists and t.resume:
            self.check_same_config()

    def create_run_dir(self) -> None:
        """Called once the data and model have loaded, so bad input never touches an existing run."""
        run, acc = self.run_dir, self.accelerator
        if self.run_exists and self.cfg.train.resume:
            return
        acc.wait_for_everyone()
        if acc.is_main_process:
            if self.run_exists:
                shutil.rmtree(run)
            run.mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(run / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            ckpt.write_text_atomic(
                run / RUN_MARKER, json.dumps({"prospect": __version__, "created": time.time()})
            )
        acc.wait_for_everyone()

    def check_same_config(self) -> None:
        saved = yaml.safe_load((self.run_dir / "config.yaml").read_text())
        current = self.cfg.to_dict()
        for section, values in current.items():
            if section == "eval":
                continue
            for key, value in values.items():
                if (section, key) in RESUMABLE_CHANGES:
                    continue
                old = saved.get(section, {}).get(key)
                if old != value:
                    raise UserError(
                        f"{self.run_dir}: cannot resume with {section}.{key}={value!r}; the run used {old!r}"
                    )

    def build_policy(self, model: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
        m = self.cfg.model
        if self.cfg.train.disable_dropout:
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.reference_mode = resolve_reference_mode(self.cfg.train.reference, m.lora_r > 0)
        self.initial_model = (
            frozen_copy(model) if self.reference_mode == "copy" and self.spec.needs_reference else None
        )
        if m.lora_r <= 0:
            return model, None
        from peft import LoraConfig, get_peft_model

        targets = m.lora_target_modules
        lora = LoraConfig(
            r=m.lora_r,
            lora_alpha=m.lora_alpha,
            lora_dropout=m.lora_dropout,
            task_type="CAUSAL_LM",
            target_modules=targets if targets == "all-linear" else [s.strip() for s in targets.split(",")],
        )
        peft_model = get_peft_model(model, lora)
        return peft_model, peft_model

    def build_reference(self, model: torch.nn.Module) -> Callable[[Sequences], torch.Tensor]:
        if self.reference_mode == "adapter":
            return adapter_reference(self.policy, self.peft_model)
        self.initial_model.to(self.device)
        return copy_reference(self.initial_model, self.bf16, self.cfg.train.logprob_chunk)

    # ----- the loop -----------------------------------------------------------------------------
    def policy_logps(self, seqs: Sequences) -> torch.Tensor:
        """Through the wrapped module, so DDP/FSDP see every forward."""
        return self.policy(seqs.input_ids, seqs.attention_mask, seqs.completion_mask).sum(-1)

    def make_batch(self, indices: list[int]) -> Batch:
        items = [self.data.items[i] for i in indices]
        kl_fit = self.encoder.fit if self.spec.needs_kl_batch else None
        return unpaired_batch(items, self.tokenizer.pad_token_id, kl_fit).to(self.device)

    def kl_estimate(self, batch: Batch) -> torch.Tensor:
        """Mean log pi/pi_ref over the mismatched pairs of this microbatch on all processes (no gradient)."""
        with torch.no_grad():
            ratios = self.policy_logps(batch.kl_sequences) - self.reference(batch.kl_sequences)
            total = torch.stack([ratios.sum(), torch.tensor(float(ratios.numel()), device=ratios.device)])
            total = self.accelerator.reduce(total, reduction="sum")
        return (total[0] / total[1]).detach()

    def microbatch_loss(self, batch: Batch, stats: StepStats) -> torch.Tensor:
        seqs = batch.sequences
        # No-grad passes first, so the wrapped policy's grad-enabled forward is the last before backward.
        reference = self.reference(seqs) if self.spec.needs_reference else None
        kl = self.kl_estimate(batch) if self.spec.needs_kl_batch else None
        policy = self.policy_logps(seqs)
        inputs = LossInputs(
            policy_logps=policy,
            completion_lengths=seqs.completion_mask.sum(-1).float(),
            reference_logps=reference,
            labels=batch.labels,
            kl_estimate=kl,
        )
        out = self.spec.compute(inputs, self.params)
        stats.add_mean("loss", out.losses.detach().sum(), out.losses.numel())
        if kl is not None:
            stats.add_mean("kl", kl, 1.0)
        for name, (total, count) in out.means.items():
            stats.add_mean(name, total, count)
        for name, value in out.totals.items():
            stats.add_total(name, value)
        stats.add_total("tokens", seqs.attention_mask.sum())
        return out.losses.sum()

    def accumulate_gradients(self) -> tuple[dict[str, float], list[Batch]]:
        """Forward and backward over this step's microbatches; gradients are left in `.grad`."""
        t = self.cfg.train
        indices = step_indices(len(self.data.items), self.global_batch, t.seed, self.step)
        rank = self.accelerator.process_index
        batches = [
            self.make_batch(microbatch_slice(indices, m, rank, self.world, t.batch_size))
            for m in range(t.grad_accum)
        ]
        # Normalise by the units of the whole step on all processes; DDP averages over processes, hence * world.
        units = self.accelerator.reduce(
            torch.tensor(float(sum(b.units for b in batches)), device=self.device), "sum"
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
            where = ", ".join(sorted({loc for b in batches for loc in b.locations}))[:500]
            self.optimizer.zero_grad(set_to_none=True)
            raise UserError(
                f"step {self.step + 1}: non-finite loss ({metrics['loss']}) or gradient norm "
                f"({metrics['grad_norm']}); examples: {where}. The last checkpoint is intact."
            )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def train(self) -> Path:
        t, started = self.cfg.train, time.perf_counter()
        resumed = self.resume() if t.resume else None
        is_main = self.accelerator.is_main_process
        metrics_log = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=self.step if resumed else None)
        if self.trackers():
            self.accelerator.init_trackers(self.run_dir.name, config=flatten(self.cfg.to_dict()))
        before = self.evaluate_heldout("before") if self.cfg.eval.num_prompts > 0 else None
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
            metrics = self.train_step()
            self.step += 1
            elapsed = time.perf_counter() - step_started
            metrics["tokens_per_s"] = metrics.pop("tokens") / elapsed
            if is_main:
                metrics_log.write({"step": self.step, **metrics})
                if self.step % max(1, t.log_every) == 0 or self.step == self.total_steps:
                    done = self.step - first_step
                    eta = (time.perf_counter() - loop_started) / done * (self.total_steps - self.step)
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
        if before and after and is_main:
            self.report(before, after)
        if self.trackers():
            self.accelerator.end_training()
        if is_main:
            print(f"done in {time.perf_counter() - started:.0f}s; model: {final}", flush=True)
        return final

    def print_banner(self) -> None:
        if not self.accelerator.is_main_process:
            return
        t, counts = self.cfg.train, self.data.counts
        mode = f"LoRA r={self.cfg.model.lora_r}" if self.peft_model is not None else "full fine-tuning"
        print(
            f"prospect {self.spec.name}: {len(self.data.items)} examples {counts}, {self.total_steps} steps of "
            f"{self.global_batch} ({t.batch_size} x {t.grad_accum} accum x {self.world} proc), {mode}, "
            f"reference={self.reference_mode if self.spec.needs_reference else 'none'}, "
            f"precision={'bf16 autocast + fp32 log-softmax' if self.bf16 else 'fp32'}, run dir {self.run_dir}",
            flush=True,
        )

    # ----- evaluation ---------------------------------------------------------------------------
    def evaluate_heldout(self, when: str) -> HeldOutResult | None:
        """Before/after comparison on held-out prompts; saved to eval_<when>.json (reused on resume)."""
        path = self.run_dir / f"eval_{when}.json"
        if when == "before" and self.step > 0:  # resumed: the untrained policy is gone
            return HeldOutResult(**json.loads(path.read_text())) if path.is_file() else None
        e = self.cfg.eval
        prompts = load_eval_prompts(self.cfg.data, self.encoder, e.num_prompts)
        if self.accelerator.is_main_process:
            print(f"evaluating {when} training on {len(prompts)} held-out prompts ...", flush=True)
        unwrapped = self.accelerator.unwrap_model(self.policy)
        reference = self.reference or (lambda seqs: self.policy_logps(seqs))
        started = time.perf_counter()
        result = evaluate(
            unwrapped.model,
            self.tokenizer,
            prompts,
            lambda s: unwrapped.sequence_logps(s),
            reference,
            get_judge(e.judge),
            e,
            seed=self.cfg.train.seed,
            bf16=self.bf16,
        )
        if self.accelerator.is_main_process:
            ckpt.write_text_atomic(path, json.dumps(result.__dict__, indent=1))
            judged = (
                f"judge {result.judge_mean:+.3f} ± {result.judge_stderr:.3f}, "
                if result.judge_mean is not None
                else ""
            )
            print(
                f"{when}: {judged}KL {result.kl_mean:.3f} ± {result.kl_stderr:.3f}, "
                f"{result.length_mean:.1f} tokens ({time.perf_counter() - started:.0f}s)",
                flush=True,
            )
            for sample in result.samples[: e.show]:
                score = f" [{sample['score']:+.2f}]" if sample["score"] is not None else ""
                print(f"  -> {sample['completion'].strip()[:160]!r}{score}", flush=True)
        return result

    def report(self, before: HeldOutResult, after: HeldOutResult) -> None:
        rows = [
            ("held-out judge score (mean)", before.judge_mean, after.judge_mean),
            ("positive fraction (> 0.05)", before.positive_fraction, after.positive_fraction),
            ("KL(policy || reference), nats", before.kl_mean, after.kl_mean),
            ("completion length, tokens", before.length_mean, after.length_mean),
        ]
        print("\n" + f"{'':34}{'before':>10}{'after':>10}")
        for name, b, a in rows:
            if b is not None and a is not None:
                print(f"{name:34}{b:>10.3f}{a:>10.3f}")
        if before.judge_mean is not None:
            print(
                f"change in judge score: {after.judge_mean - before.judge_mean:+.3f} "
                f"(± {math.hypot(before.judge_stderr, after.judge_stderr):.3f}) at a KL of {after.kl_mean:.3f} nats"
            )
        summary = {"before": before.summary(), "after": after.summary()}
        ckpt.write_text_atomic(self.run_dir / "report.json", json.dumps(summary, indent=1))

    # ----- checkpoints --------------------------------------------------------------------------
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path | None:
        root, acc = self.checkpoint_root(), self.accelerator
        tmp = root / f".{ckpt.step_dir_name(self.step)}.tmp"
        if acc.is_main_process:
            tmp = ckpt.temporary_dir(root, self.step)
            model = acc.unwrap_model(self.policy)
            ckpt.save_weights(model, tmp / "model.safetensors")
            ckpt.save_optimizer(
                self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer, tmp
            )
            ckpt.write_json(tmp / "scheduler.json", self.scheduler.state_dict())
        acc.wait_for_everyone()
        ckpt.save_rng(tmp / f"rng-{acc.process_index}.safetensors")
        acc.wait_for_everyone()
        final = None
        if acc.is_main_process:
            ckpt.write_json(
                tmp / ckpt.STATE_FILE,
                {"step": self.step, "total_steps": self.total_steps, "world_size": self.world},
            )
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
        ckpt.load_weights(self.accelerator.unwrap_model(self.policy), path / "model.safetensors")
        ckpt.load_optimizer(
            self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer, path
        )
        self.scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
        ckpt.load_rng(path / f"rng-{self.accelerator.process_index}.safetensors")
        self.step = step
        if self.accelerator.is_main_process:
            print(f"resumed from {path} (step {step} of {self.total_steps})", flush=True)
        return path

    def save_final_model(self) -> Path:
        """A plain transformers checkpoint (config, safetensors, tokenizer with chat template); LoRA is merged."""
        final = self.run_dir / "final"
        acc = self.accelerator
        if acc.is_main_process:
            model = acc.unwrap_model(self.policy).model
            tmp = Path(tempfile.mkdtemp(prefix=".final.", dir=self.run_dir))
            if self.peft_model is not None:
                model.save_pretrained(tmp / "adapter")
                model = copy.deepcopy(model).merge_and_unload()
            model.save_pretrained(tmp, safe_serialization=True)
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
