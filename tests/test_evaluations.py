"""Evaluation during training (eval.every): the held-out loss, best/ by eval.best_metric, early stopping, resume;
the time left a run reports; the run directory announced first."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from prospect.cli import main
from prospect.engine.periodic_eval import Evaluations
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.progress import Progress
from prospect.recipe import load_config
from tests.helpers import paired_rows, tiny_overrides, unpaired_rows, write_jsonl


def make_trainer(model_dir, data, out, callbacks=None, **extra) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(model_dir, data, out, **extra)), callbacks=callbacks)


@pytest.fixture
def heldout(tmp_path):
    return write_jsonl(tmp_path / "heldout.jsonl", unpaired_rows(12))


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(
    ("loss", "rows", "step_zero"),
    [("kto", unpaired_rows, 0.5), ("dpo", paired_rows, math.log(2))],
)
def test_held_out_loss_is_the_training_loss_on_held_out_rows(loss, rows, step_zero, tiny_model_dir, tmp_path):
    """At step 0 policy = reference: the held-out loss is the loss's own step-0 value (KTO 0.5 lambda, DPO
    ln 2). It runs with no gradient, gives the policy back in train mode, and works with the reference cache,
    which knows no held-out rows (the live reference answers for them)."""
    data = write_jsonl(tmp_path / "train.jsonl", rows(48))
    options = {
        "loss.name": loss,
        "data.eval": str(write_jsonl(tmp_path / "heldout.jsonl", rows(10))),
        "eval.every": 2,
        "train.reference_cache": True,
    }
    trainer = make_trainer(tiny_model_dir, data, tmp_path / "run", **options)
    assert len(trainer.evals.items) == 10
    trainer.precompute_reference()
    trainer.release_reference_copy()
    assert trainer.evals.held_out_loss(trainer) == pytest.approx(step_zero, abs=1e-6)
    assert trainer.policy.training and all(p.grad is None for p in trainer.policy.parameters())
    trainer.train()
    evals = records(tmp_path / "run" / "evals.jsonl")
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] != pytest.approx(step_zero, abs=1e-4) for r in evals)  # it moved


def test_best_model_is_kept_and_training_stops_early_and_stays_stopped(
    tiny_model_dir, kto_file, heldout, tmp_path, monkeypatch
):
    """Scripted held-out losses: the best is at step 4; two evaluations without improvement stop the run at
    step 8. best/ holds the weights of step 4, final/ those of step 8, and resuming the run trains no more."""
    losses = iter([0.5, 0.4, 0.45, 0.41, 0.3])
    monkeypatch.setattr(Evaluations, "held_out_loss", lambda self, trainer: next(losses))
    seen: dict[int, dict[str, torch.Tensor]] = {}

    def keep_weights(trainer, result):
        model = trainer.accelerator.unwrap_model(trainer.policy).model
        seen[result.step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    run = tmp_path / "run"
    options = {
        "data.eval": str(heldout),
        "train.max_steps": 20,
        "eval.every": 2,
        "eval.best_metric": "eval_loss",
        "eval.early_stopping_patience": 2,
    }
    make_trainer(tiny_model_dir, kto_file, run, callbacks=[keep_weights], **options).train()
    evals = records(run / "evals.jsonl")
    assert [(r["step"], r["eval_loss"], r["best"]) for r in evals] == [
        (2, 0.5, True),
        (4, 0.4, True),
        (6, 0.45, False),
        (8, 0.41, False),
    ]
    assert len(records(run / "metrics.jsonl")) == 8
    for name, step in (("best", 4), ("final", 8)):
        saved = load_file(str(run / name / "model.safetensors"))
        assert all(torch.equal(saved[k], seen[step][k]) for k in saved), name
    assert not torch.equal(seen[4]["model.embed_tokens.weight"], seen[8]["model.embed_tokens.weight"])
    assert (run / "checkpoints" / "step-000008").is_dir()  # the stop is saved, so resume knows of it
    resumed = make_trainer(tiny_model_dir, kto_file, run, **options, **{"train.resume": True})
    resumed.train()
    assert resumed.step == 8 and len(records(run / "metrics.jsonl")) == 8


def test_a_resumed_run_evaluates_as_an_uninterrupted_one(tiny_model_dir, kto_file, heldout, tmp_path):
    """Killed at step 5 and resumed from step 4: evals.jsonl is cut back and continues, the best so far is
    restored from the checkpoint, and best/ ends as the uninterrupted run's."""

    class StopAt:
        def __call__(self, trainer, result):
            if result.step == 5:
                raise KeyboardInterrupt

    options = {
        "data.eval": str(heldout),
        "train.max_steps": 8,
        "train.save_every": 2,
        "eval.every": 2,
        "eval.best_metric": "eval_loss",
    }
    make_trainer(tiny_model_dir, kto_file, tmp_path / "straight", **options).train()
    broken = tmp_path / "broken"
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tiny_model_dir, kto_file, broken, callbacks=[StopAt()], **options).train()
    make_trainer(tiny_model_dir, kto_file, broken, **options, **{"train.resume": True}).train()
    assert records(broken / "evals.jsonl") == records(tmp_path / "straight" / "evals.jsonl")
    straight, resumed = (
        load_file(str(r / "best" / "model.safetensors")) for r in (tmp_path / "straight", broken)
    )
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"eval.best_metric": "eval_loss"},
            "eval.best_metric and eval.early_stopping_patience need eval.every",
        ),
        (
            {"eval.every": 2, "eval.early_stopping_patience": 3},
            "name the metric to watch with eval.best_metric",
        ),
        (
            {"eval.every": 2, "eval.best_metric": "judge_mean", "eval.num_prompts": 4},
            r"eval.best_metric=judge_mean: needs a policy, eval.num_prompts > 0 and a judge",
        ),
        (
            {"eval.every": 2, "eval.best_metric": "pair_accuracy", "eval.num_prompts": 4},
            "eval.best_metric=pair_accuracy: needs a reward model loss",
        ),
        (
            {"eval.every": 2, "eval.best_metric": "eval_loss", "eval.loss_rows": 0},
            r"eval.best_metric=eval_loss: needs eval.loss_rows > 0",
        ),
    ],
)
def test_evaluation_options_that_do_not_fit_are_refused_first(
    options, message, tiny_model_dir, kto_file, tmp_path
):
    with pytest.raises(UserError, match=message):
        make_trainer(tiny_model_dir, kto_file, tmp_path / "run", **options)
    assert not (tmp_path / "run").exists()


def evaluations(tmp_path, **options) -> Evaluations:
    config = load_config(None, [f"{k}={v}" for k, v in options.items()])
    from prospect.losses import get_loss

    return Evaluations(config, get_loss("kto"), None, tmp_path, is_main=True)  # type: ignore[arg-type]


def test_time_left_counts_the_evaluations_still_due(tmp_path):
    """2 s a step over 5 steps so far, 10 steps: 10 s of training left. Without eval.every the final
    evaluation is left (as long as the last one took); with it, each one due from this step on."""
    training = Progress("training", 10, "steps", show=False)
    training.update(5)
    training.started -= 10.0
    once = evaluations(tmp_path)
    assert once.time_left(5, 10, training, final=True) == "10s + 1 evaluation(s), not yet timed"
    once.seconds = 30.0
    assert once.time_left(5, 10, training, final=True) == "40s"
    assert once.time_left(5, 10, training, final=False) == "10s"
    every = evaluations(tmp_path, **{"eval.every": 4, "eval.loss_rows": 0})
    assert [every.pending(s, 10, final=True) for s in (1, 4, 5, 8, 9, 10)] == [3, 3, 2, 2, 1, 1]
    assert [every.pending(s, 8, final=True) for s in (1, 4, 5, 8)] == [2, 2, 1, 1]
    every.seconds, every.spent = 3.0, 4.0  # evaluations inside the loop do not count as training time
    assert every.time_left(5, 10, training, final=True) == f"{round(6 / 5 * 5 + 2 * 3)}s"


def test_the_run_directory_and_report_are_named_first(
    tiny_model_dir, kto_file, tmp_path, capsys, monkeypatch
):
    """The run directory before anything slow; the held-out sampling before and after training with its
    progress (a log file's lines here: stderr is no terminal); the report path again at the end."""
    monkeypatch.setattr(Progress, "interval", 0.0)
    out = tmp_path / "run"
    options = {"eval.num_prompts": 2, "eval.max_new_tokens": 2, "train.max_steps": 2}
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *tiny_overrides(tiny_model_dir, kto_file, out, **options)])
    assert exit_info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run directory {out}; report: {out / 'report.json'} when done"
    assert lines[-1].startswith("done in ") and f"report: {out / 'report.json'}" in lines[-1]
    for when in ("before", "after"):
        for phase in (
            rf"held-out samples, {when} training: (\d+)/\1 prompts",
            f"KL on the samples, {when} training",
        ):
            assert any(re.match(phase + r".* \(100%\), \d+s elapsed, eta 0s$", line) for line in lines), phase
    assert (out / "report.json").is_file()
