"""The run's held-out evaluations: before and after training, during it (`eval.every`), and the time the run
has left.

Before and after: eval_before.json and eval_after.json (a resumed run reads the one before back). Every
`eval.every` steps and at the last step: the held-out loss on `eval.loss_rows` held-out rows, and the
evaluation of before and after (samples, judge, KL) when `eval.num_prompts > 0`; a line of evals.jsonl each
(cut back on resume like metrics.jsonl), and `eval/...` for the trackers. The model that scores best on
`eval.best_metric` is kept in best/ (written like final/: whole, then renamed into place);
`eval.early_stopping_patience` evaluations without improvement end training. The state (best so far,
evaluations since, stopped) travels in the checkpoint, so a resumed run decides as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from torch import nn

from prospect.config import Config
from prospect.data.batching import Batch
from prospect.data.pipeline import encode_all, read_heldout
from prospect.data.tokenize import Encoder
from prospect.engine.checkpoint import Checkpointer
from prospect.engine.heads import HEADS, Evaluation
from prospect.engine.metrics import MetricsLog, StepStats
from prospect.engine.sharding import gathered
from prospect.errors import UserError
from prospect.io import write_text_atomic
from prospect.losses.base import LossSpec
from prospect.progress import Progress, duration

LOWER_IS_BETTER = ("eval_loss",)
SAMPLED = ("judge_mean", "positive_fraction")  # held-out samples of a policy, judged
REWARD_MODEL = ("pair_accuracy", "pearson_r", "sign_accuracy")


class Evaluated(Protocol):
    """What the evaluations use of the trainer."""

    step: int
    total_steps: int
    # The loss's reference: the live one stands in while the held-out loss runs (a cache knows no held-out rows).
    reference: Any

    @property
    def policy(self) -> nn.Module: ...
    @property
    def live_reference(self) -> Any: ...
    @property
    def accelerator(self) -> Accelerator: ...
    @property
    def checkpointer(self) -> Checkpointer: ...
    @property
    def evaluation(self) -> Evaluation: ...  # the head's: samples, judge and KL, or a reward model's accuracy

    def trackers(self) -> list[str] | None: ...
    def batch_of(self, items: list) -> Batch: ...
    def microbatch_loss(self, batch: Batch, stats: StepStats) -> torch.Tensor: ...


def check_evaluation(config: Config, spec: LossSpec) -> None:
    """The eval options that only make sense together, before anything loads."""
    e, head = config.eval, HEADS[spec.model]
    metric, where = e.best_metric, f"eval.best_metric={e.best_metric}"
    if (metric != "none" or e.early_stopping_patience) and not e.every:
        raise UserError("eval.best_metric and eval.early_stopping_patience need eval.every > 0 (steps)")
    if e.early_stopping_patience and metric == "none":
        raise UserError("eval.early_stopping_patience: name the metric to watch with eval.best_metric")
    if metric == "eval_loss" and not (e.loss_rows and spec.loop == "offline"):
        raise UserError(f"{where}: needs eval.loss_rows > 0 and an offline loss (not '{spec.name}')")
    if metric in SAMPLED and not (head.samples_for_evaluation and e.num_prompts and e.judge != "none"):
        raise UserError(f"{where}: needs a policy, eval.num_prompts > 0 and a judge (eval.judge)")
    if metric in REWARD_MODEL and (head.samples_for_evaluation or not e.num_prompts):
        raise UserError(f"{where}: needs a reward model loss and eval.num_prompts > 0 held-out rows")


def numbers(result: Any) -> dict[str, float | None]:
    """The scalar fields of an evaluation result (HeldOutResult, RewardEval)."""
    fields = dataclasses.asdict(result).items()
    return {k: v for k, v in fields if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))}


class Evaluations:
    def __init__(self, config: Config, spec: LossSpec, encoder: Encoder | None, run_dir: Path, is_main: bool):
        """`encoder` None: no held-out loss (a denoiser, whose evaluation options are refused first)."""
        e = config.eval
        self.every, self.metric, self.patience = e.every, e.best_metric, e.early_stopping_patience
        self.sampled = e.num_prompts > 0
        self.run_dir, self.path, self.is_main = run_dir, run_dir / "evals.jsonl", is_main
        self.batch_size = config.train.batch_size
        self.min_batch = spec.reference_point.min_batch_size if spec.reference_point else 1
        self.items: list = []
        if self.every and e.loss_rows and spec.loop == "offline" and encoder is not None:
            rows = read_heldout(config.data, spec.data, config.train.seed)[: e.loss_rows]
            self.items = encode_all(rows, encoder).items
            if len(self.items) < self.min_batch:
                raise UserError(
                    f"eval.loss_rows: the held-out data gives {len(self.items)} item(s); loss '{spec.name}' "
                    f"needs batches of at least {self.min_batch}"
                )
        self.best: float | None = None
        self.best_step = self.since_best = 0
        self.stopped = False
        self.last: tuple[int, Any] | None = None  # (step, sampled result): the final evaluation reuses it
        self.seconds: float | None = None  # the last evaluation's duration, for the ETA
        self.spent = 0.0  # seconds spent evaluating inside the training loop
        self.log: MetricsLog | None = None

    def state(self) -> dict:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "since_best": self.since_best,
            "stopped": self.stopped,
        }

    def load_state(self, state: dict) -> None:
        self.best, self.best_step = state.get("best"), state.get("best_step", 0)
        self.since_best, self.stopped = state.get("since_best", 0), state.get("stopped", False)

    def start(self, resumed_at: int | None) -> None:
        if self.every and self.is_main:
            self.log = MetricsLog(self.path, resume_step=resumed_at)

    def due(self, step: int, total: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == total)

    def pending(self, step: int, total: int, final: bool) -> int:
        """Evaluations still to run once step `step` is done (its own included); `final`: the run evaluates
        after training."""
        if not self.every:
            return int(final)
        return total // self.every - (step - 1) // self.every + int(total % self.every != 0)

    def time_left(self, step: int, total: int, training: Progress, final: bool) -> str:
        """The remaining steps at the training rate so far (evaluations excluded) and the evaluations due."""
        made = training.done - training.first
        per_step = max(training.elapsed - self.spent, 0.0) / made if made else 0.0
        left, pending = per_step * (total - step), self.pending(step, total, final)
        if pending and self.seconds is None:
            return f"{duration(left)} + {pending} evaluation(s), not yet timed"
        return duration(left + pending * (self.seconds or 0.0))

    def evaluate(self, trainer: Evaluated, when: str) -> Any:
        """`when` "before" or "after" training: the held-out evaluation, saved to eval_<when>.json. A resumed
        run reads the one before back (the untrained model is gone); the one after reuses an evaluation the
        last step made."""
        path = self.run_dir / f"eval_{when}.json"
        if when == "before" and trainer.step > 0:
            kind = trainer.evaluation.result_type
            return kind(**json.loads(path.read_text())) if path.is_file() else None
        last = self.last
        if when == "after" and last is not None and last[0] == trainer.step:
            result = last[1]
        else:
            started = time.perf_counter()
            result = self.held_out(trainer, when)
            self.seconds = time.perf_counter() - started
        if self.is_main:
            write_text_atomic(path, json.dumps(result.__dict__, indent=1))
        return result

    def held_out(self, trainer: Evaluated, when: str) -> Any:
        with gathered(trainer.policy):  # sampling runs without collectives
            policy = trainer.accelerator.unwrap_model(trainer.policy)
            return trainer.evaluation(policy, trainer.live_reference, when)

    def after_step(self, trainer: Evaluated) -> bool:
        """Evaluate when due, keep best/, and say whether training stops here."""
        step = trainer.step
        if not self.due(step, trainer.total_steps):
            return False
        started = time.perf_counter()
        record: dict[str, float | None] = {}
        if self.items:
            record["eval_loss"] = self.held_out_loss(trainer)
        if self.sampled:
            result = self.held_out(trainer, f"at step {step}")
            self.last = (step, result)
            record.update(numbers(result))
        improved = self.judge(record, step)
        if improved:
            trainer.checkpointer.save_final_model("best")
        if trainer.trackers():
            trainer.accelerator.log({f"eval/{k}": v for k, v in record.items() if v is not None}, step=step)
        self.seconds = time.perf_counter() - started
        self.spent += self.seconds
        if self.is_main and self.log is not None:
            self.log.write({"step": step, **record, "best": improved})
            shown = ", ".join(
                f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and not k.endswith("stderr")
            )
            kept = " (best so far: saved best/)" if improved else ""
            print(f"evaluation at step {step}: {shown}{kept} ({duration(self.seconds)})", flush=True)
        if self.patience and self.since_best >= self.patience:
            self.stopped = True
            if self.is_main:
                print(
                    f"early stopping at step {step}: eval.best_metric={self.metric} has not improved for "
                    f"{self.since_best} evaluations{self.summary()}",
                    flush=True,
                )
        return self.stopped

    def judge(self, record: dict[str, float | None], step: int) -> bool:
        """Whether `record` beats the best so far on the metric (counting evaluations since the best)."""
        if self.metric == "none":
            return False
        value = record.get(self.metric)
        if value is None:
            raise UserError(
                f"eval.best_metric={self.metric}: the evaluation at step {step} gives no {self.metric}"
            )
        sign = -1.0 if self.metric in LOWER_IS_BETTER else 1.0
        if not math.isnan(value) and (self.best is None or sign * value > sign * self.best):
            self.best, self.best_step, self.since_best = value, step, 0
            return True
        self.since_best += 1
        return False

    def held_out_loss(self, trainer: Evaluated) -> float:
        """The training loss on the held-out items, in batches of train.batch_size (a short last batch joins
        the one before it), with no gradient, dropout or cache: the live reference runs on them."""
        starts = list(range(0, len(self.items), self.batch_size))
        if len(starts) > 1 and len(self.items) - starts[-1] < self.min_batch:
            starts.pop()
        bounds = [*starts[1:], len(self.items)]
        stats, cached = StepStats(), trainer.reference
        trainer.reference, was_training = trainer.live_reference or cached, trainer.policy.training
        trainer.policy.eval()
        try:
            with torch.no_grad():
                for start, stop in zip(starts, bounds):
                    trainer.microbatch_loss(trainer.batch_of(self.items[start:stop]), stats)
        finally:
            trainer.reference = cached
            trainer.policy.train(was_training)
        return stats.reduce(lambda flat: flat)["loss"]

    def summary(self) -> str:
        if self.metric == "none" or self.best is None:
            return ""
        return f"; best: {self.run_dir / 'best'} (step {self.best_step}, {self.metric} {self.best:.4g})"
