"""accelerate's `mixed_precision` (a launch config's, passed on as ACCELERATE_MIXED_PRECISION) and
`train.precision` are one setting: prospect honours bf16 for the policy and the reference alike, and refuses
a combination it cannot honour. accelerate's own autocast, which wraps the policy only, stays off."""

from __future__ import annotations

import json

import pytest

from prospect.engine.launch import configure_deepspeed
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.recipe import load_config
from tests.helpers import tiny_overrides


def trainer(tiny_model_dir, kto_file, out, precision: str) -> Trainer:
    options = {"train.max_steps": 1, "train.precision": precision}
    return Trainer(load_config(None, tiny_overrides(tiny_model_dir, kto_file, out, **options)))


def test_accelerate_bf16_is_honoured_for_policy_and_reference(
    tiny_model_dir, kto_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = trainer(tiny_model_dir, kto_file, tmp_path / "run", "auto")
    assert run.bf16
    assert run.accelerator.mixed_precision == "no"
    run.train()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # Before the fix accelerate autocast the policy only: with train.precision=fp32 the step-1 KL estimate was
    # 2e-4 and the rewards (beta log pi/pi_ref) were not 0.
    assert first["rewards/desirable"] == 0.0 and first["rewards/undesirable"] == 0.0


def test_accelerate_autocast_of_the_policy_alone_would_show_in_the_first_rewards(
    tiny_model_dir, kto_file, tmp_path, monkeypatch, request
):
    """The control for the test above: with accelerate's own bf16 autocast on (the policy autocast, the
    reference not), the step-1 rewards are not 0, so the zeros above say both ran in one precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from prospect.engine import launch

    AcceleratorState._reset_state(reset_partial_state=True)  # earlier tests' state says mixed_precision 'no'
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    monkeypatch.setattr(launch, "Accelerator", lambda **kw: Accelerator(**{**kw, "mixed_precision": "bf16"}))
    run = trainer(tiny_model_dir, kto_file, tmp_path / "run", "fp32")
    assert run.accelerator.mixed_precision == "bf16" and not run.bf16
    run.train()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/desirable"] != 0.0 or first["rewards/undesirable"] != 0.0


@pytest.mark.parametrize(
    ("launched", "precision", "expected"),
    [
        ("bf16", "fp32", "mixed_precision=bf16 .* conflicts with train.precision=fp32"),
        ("fp16", "auto", "mixed_precision=fp16 .*: prospect computes in bf16 or fp32"),
        ("FP8", "bf16", "mixed_precision=fp8 "),
    ],
)
def test_a_conflicting_launch_precision_is_refused(
    launched, precision, expected, tiny_model_dir, kto_file, tmp_path, monkeypatch
):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    with pytest.raises(UserError, match=expected):
        trainer(tiny_model_dir, kto_file, tmp_path / "run", precision)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_deepspeed_config_with_bf16_weights_is_refused():
    train = load_config(None, []).train
    with pytest.raises(UserError, match=r"bf16\.enabled must be false or auto"):
        configure_deepspeed({"bf16": {"enabled": True}}, train)
    config = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": False}}
    configure_deepspeed(config, train)
    assert config["gradient_accumulation_steps"] == 1
