"""The training loop on a tiny model: direction of learning, accumulation scaling, resume, saving."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from prospect.data.shapes import make_batch
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.recipe import load_config
from tests.helpers import tiny_overrides


def make_trainer(tiny_model_dir, data, out, callbacks=None, **extra) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(tiny_model_dir, data, out, **extra)), callbacks=callbacks)


def mean_logps(trainer: Trainer) -> tuple[float, float]:
    """Mean summed log-prob of the desirable and of the undesirable training completions."""
    items = trainer.data.items
    batch = make_batch(items, "unpaired", trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logps = trainer.accelerator.unwrap_model(trainer.policy).sequence_logps(batch.sequences)
    return logps[batch.labels].mean().item(), logps[~batch.labels].mean().item()


def test_kto_raises_desirable_and_lowers_undesirable(tiny_model_dir, kto_file, tmp_path):
    trainer = make_trainer(tiny_model_dir, kto_file, tmp_path / "run", **{"train.max_steps": 30})
    desirable_before, undesirable_before = mean_logps(trainer)
    trainer.train()
    desirable_after, undesirable_after = mean_logps(trainer)
    assert desirable_after > desirable_before + 1.0
    assert undesirable_after < undesirable_before - 1.0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 30
    first, last = (json.loads(line) for line in (lines[0], lines[-1]))
    assert first["loss"] == pytest.approx(0.5)  # policy == reference at step 0: KTO = 0.5 * lambda
    assert last["rewards/desirable"] > 0 > last["rewards/undesirable"]
    for key in (
        "kl_estimate_raw",
        "reference_point",
        "rewards/desirable",
        "rewards/undesirable",
        "count/desirable",
        "count/undesirable",
        "lr",
        "grad_norm",
        "tokens_per_s",
    ):
        assert key in first
    # The logged reference point is what the loss used: the raw mismatched-pairs estimate clamped at 0 (one
    # microbatch per step here), and the raw one is logged as it is, negative or not.
    records = [json.loads(line) for line in lines]
    assert all(r["reference_point"] == pytest.approx(max(r["kl_estimate_raw"], 0.0)) for r in records)
    assert any(r["kl_estimate_raw"] != r["reference_point"] for r in records)


@pytest.mark.parametrize("loss", ["kto_zero", "kto_logsigmoid"])
def test_kto_variants_train_in_the_right_direction(loss, tiny_model_dir, kto_file, tmp_path):
    """The HALO variants added through the spec alone: KTO-zero runs no KL batch (its reference point is 0)."""
    trainer = make_trainer(
        tiny_model_dir, kto_file, tmp_path / "run", **{"train.max_steps": 20, "loss.name": loss}
    )
    batch = trainer.make_batch(list(range(4)))
    assert (batch.point_sequences is None) == (loss == "kto_zero")
    desirable_before, undesirable_before = mean_logps(trainer)
    trainer.train()
    desirable_after, undesirable_after = mean_logps(trainer)
    assert desirable_after > desirable_before + 1.0 and undesirable_after < undesirable_before - 1.0
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert ("kl_estimate_raw" in first) == ("reference_point" in first) == (loss != "kto_zero")
    assert first["loss"] == pytest.approx(0.5 if loss == "kto_zero" else math.log(2))  # value(0) at step 0


def test_accumulation_equals_one_big_batch(tiny_model_dir, kto_file, tmp_path):
    """Two microbatches of 4 give the gradient of one batch of 8 (at step 0 both KL estimates are 0)."""
    big = make_trainer(tiny_model_dir, kto_file, tmp_path / "big", **{"train.batch_size": 8})
    small = make_trainer(
        tiny_model_dir, kto_file, tmp_path / "small", **{"train.batch_size": 4, "train.grad_accum": 2}
    )
    metrics_big, _ = big.accumulate_gradients()
    metrics_small, _ = small.accumulate_gradients()
    assert metrics_small["loss"] == pytest.approx(metrics_big["loss"], abs=1e-7)
    grads_big = [p.grad for p in big.policy.parameters()]
    grads_small = [p.grad for p in small.policy.parameters()]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads_big, grads_small))
    assert sum(g.abs().sum() for g in grads_big) > 0


@pytest.mark.parametrize("packed", [False, True])
def test_skipping_the_nan_fill_of_new_memory_changes_no_result(packed, tiny_model_dir, kto_file, tmp_path):
    """Deterministic mode fills every new tensor with NaN unless told not to; the trainer turns the fill off
    for speed. A kernel that read memory it had not written would give a different (NaN) result with it on."""
    trainer = make_trainer(
        tiny_model_dir, kto_file, tmp_path / "run",
        **{"train.precision": "bf16", "train.padding_free": packed, "train.batch_size": 8},
    )  # fmt: skip
    assert torch.utils.deterministic.fill_uninitialized_memory is False  # type: ignore[attr-defined]
    results = []
    try:
        for fill in (False, True):
            torch.utils.deterministic.fill_uninitialized_memory = fill  # type: ignore[attr-defined]
            trainer.policy.zero_grad(set_to_none=True)
            metrics, _ = trainer.accumulate_gradients()
            results.append((metrics["loss"], [p.grad.clone() for p in trainer.policy.parameters()]))
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert loss_off == loss_on and math.isfinite(loss_off)
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads_on, strict=True))
    assert sum(g.abs().sum() for g in grads_off) > 0


def final_weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


class StopAt:
    def __init__(self, step: int):
        self.step = step

    def __call__(self, trainer, result):
        if result.step == self.step:
            raise KeyboardInterrupt


def test_resume_after_interruption_is_bit_identical(tiny_model_dir, kto_file, tmp_path):
    options = {"train.max_steps": 6, "train.save_every": 2, "train.keep_last": 1}
    make_trainer(tiny_model_dir, kto_file, tmp_path / "straight", **options).train()
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tiny_model_dir, kto_file, tmp_path / "broken", callbacks=[StopAt(3)], **options).train()
    checkpoints = sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"]  # step 3 ran but was not saved: resume must redo it
    resumed = make_trainer(tiny_model_dir, kto_file, tmp_path / "broken", **options, **{"train.resume": True})
    resumed.train()
    straight, broken = final_weights(tmp_path / "straight"), final_weights(tmp_path / "broken")
    assert straight.keys() == broken.keys()
    assert all(torch.equal(straight[k], broken[k]) for k in straight)
    lines = (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]  # the unsaved step 3 is not logged twice


def test_resume_refuses_a_changed_config(tiny_model_dir, kto_file, tmp_path):
    make_trainer(tiny_model_dir, kto_file, tmp_path / "run", **{"train.max_steps": 1}).train()
    with pytest.raises(UserError, match=r"cannot resume with train.learning_rate=0.5; the run used 0.001"):
        make_trainer(
            tiny_model_dir,
            kto_file,
            tmp_path / "run",
            **{"train.max_steps": 1, "train.resume": True, "train.learning_rate": 0.5},
        )


def test_resume_reads_an_option_the_run_predates_as_its_default(tiny_model_dir, kto_file, tmp_path):
    run = tmp_path / "run"
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 1}).train()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["train"]["max_skips"]  # as written by a prospect from before the option existed
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 1, "train.resume": True}).train()
    with pytest.raises(UserError, match=r"cannot resume with train.max_skips=4; the run used 10"):
        make_trainer(
            tiny_model_dir,
            kto_file,
            run,
            **{"train.max_steps": 1, "train.resume": True, "train.max_skips": 4},
        )


def test_existing_run_dir_is_never_silently_overwritten(tiny_model_dir, kto_file, tmp_path):
    run = tmp_path / "run"
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 1}).train()
    with pytest.raises(UserError, match="run directory exists; pass --resume to continue it or --overwrite"):
        make_trainer(tiny_model_dir, kto_file, run)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserError, match=r"not a prospect run directory .* refusing to delete it"):
        make_trainer(tiny_model_dir, kto_file, foreign, **{"train.overwrite": True})
    assert (foreign / "holiday.jpg").exists()
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 1, "train.overwrite": True}).train()
    assert (run / "final" / "model.safetensors").exists()


def test_overwrite_loses_nothing_until_the_new_run_has_a_step(tiny_model_dir, kto_file, tmp_path):
    """An --overwrite run that fails before its first step puts the old run back; one that succeeds deletes
    only what prospect wrote and keeps the user's own files; a failed fresh run leaves no directory."""
    run = tmp_path / "run"
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 1}).train()
    (run / "notes.txt").write_text("why this run matters")
    before = sorted(p.name for p in run.iterdir())
    failing = {"train.overwrite": True, "eval.num_prompts": 2, "eval.judge": "reward"}  # no reward source
    with pytest.raises(
        UserError, match=r"set exactly one of online\.reward_model and online\.reward_function"
    ):
        make_trainer(tiny_model_dir, kto_file, run, **failing).train()
    assert sorted(p.name for p in run.iterdir()) == before and not list(tmp_path.glob(".run.*"))
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError):
        make_trainer(
            tiny_model_dir, kto_file, fresh, **{k: v for k, v in failing.items() if k != "train.overwrite"}
        ).train()
    assert not fresh.exists()
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 2, "train.overwrite": True}).train()
    assert (run / "notes.txt").read_text() == "why this run matters"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2 and not list(tmp_path.glob(".run.*"))


def test_output_directory_holding_an_input_is_refused(tiny_model_dir, kto_file, tmp_path):
    """--overwrite would delete the data it trains on: refused before anything is touched."""
    run = tmp_path / "run"
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 1}).train()
    data = run / "feedback.jsonl"
    data.write_bytes(kto_file.read_bytes())
    with pytest.raises(UserError, match=r"the output directory holds the input data.train=.*feedback.jsonl"):
        make_trainer(tiny_model_dir, data, run, **{"train.overwrite": True})
    assert data.exists() and (run / "final").exists()
    with pytest.raises(UserError, match=r"the output directory is inside the input model.name="):
        make_trainer(tiny_model_dir, kto_file, tiny_model_dir / "runs" / "x")


@pytest.mark.parametrize("lora", [0, 4])
def test_final_model_loads_in_plain_transformers(tiny_model_dir, kto_file, tmp_path, lora):
    trainer = make_trainer(tiny_model_dir, kto_file, tmp_path / "run", **{"model.lora_r": lora})
    final = trainer.train()
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["model.safetensors"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Review the cartoon."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # The saved model computes what the trained policy computes (LoRA merged into the weights).
    ids = torch.tensor([trainer.data.items[0].prompt_ids + trainer.data.items[0].completion_ids])
    with torch.no_grad():
        expected = trainer.accelerator.unwrap_model(trainer.policy).model(input_ids=ids).logits
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)


def test_lora_reference_is_the_policy_without_its_adapter(tiny_model_dir, kto_file, tmp_path):
    trainer = make_trainer(
        tiny_model_dir, kto_file, tmp_path / "run", **{"model.lora_r": 4, "train.max_steps": 3}
    )
    assert trainer.reference_mode == "adapter" and trainer.initial_model is None
    batch = trainer.make_batch(list(range(4)))
    before = trainer.reference(batch.sequences)
    assert torch.equal(
        before, batch.sequences.per_sequence(trainer.policy_token_logps(batch.sequences)).detach()
    )  # B = 0 at the start
    trainer.train()
    assert torch.equal(trainer.reference(batch.sequences), before)  # the reference did not move
    assert not torch.equal(
        batch.sequences.per_sequence(trainer.policy_token_logps(batch.sequences)).detach(), before
    )  # the policy did


def test_batch_size_one_is_refused_for_kto(tiny_model_dir, kto_file, tmp_path):
    with pytest.raises(UserError, match=r"train.batch_size=1: loss 'kto' pairs each prompt with another"):
        make_trainer(tiny_model_dir, kto_file, tmp_path / "run", **{"train.batch_size": 1})
    assert not (tmp_path / "run").exists()


def test_training_steps_run_in_train_mode_with_checkpointing_after_an_evaluation(
    tiny_model_dir, kto_file, tmp_path
):
    """Held-out sampling puts the model in eval mode; the next training step must switch back, or gradient
    checkpointing (and dropout) silently stop working."""
    trainer = make_trainer(
        tiny_model_dir,
        kto_file,
        tmp_path / "run",
        **{
            "train.max_steps": 2,
            "model.gradient_checkpointing": True,
            "eval.num_prompts": 2,
            "eval.max_new_tokens": 2,
        },
    )
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    seen: list[tuple[bool, bool]] = []

    def record(module, args):
        if torch.is_grad_enabled():
            seen.append((module.training, module.gradient_checkpointing))

    model.model.register_forward_pre_hook(record)
    trainer.train()
    assert seen and all(training and checkpointing for training, checkpointing in seen)


def test_a_checkpoint_is_never_written_of_weights_that_are_not_finite(tiny_model_dir, kto_file, tmp_path):
    trainer = make_trainer(tiny_model_dir, kto_file, tmp_path / "run", **{"train.max_steps": 1})
    trainer.train()
    with torch.no_grad():
        next(p for p in trainer.policy.parameters() if p.requires_grad).view(-1)[0] = float("inf")
    with pytest.raises(
        UserError,
        match=r"step 2: the weights are no longer finite; not saved \(the last "
        r"checkpoint, step-000001, holds finite ones\)",
    ):
        trainer.checkpointer.save(2, 2)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000001"]


def test_overwrite_killed_before_its_first_step_keeps_the_last_complete_run(
    tiny_model_dir, kto_file, tmp_path
):
    """A SIGKILL between setting the old run aside and the first step: the next --overwrite keeps the old run
    set aside (it is the last complete one) until a new run has a step."""
    run = tmp_path / "run"
    make_trainer(tiny_model_dir, kto_file, run, **{"train.max_steps": 1}).train()
    killed = make_trainer(
        tiny_model_dir, kto_file, run, **{"train.overwrite": True}
    )  # sets the old run aside
    aside = tmp_path / ".run.replaced"
    assert (aside / "final").is_dir() and killed.run.set_aside == aside  # ... and the process dies here
    again = make_trainer(tiny_model_dir, kto_file, run, **{"train.overwrite": True, "train.max_steps": 1})
    assert (aside / "final").is_dir()
    again.train()
    assert not aside.exists() and (run / "final").is_dir()
