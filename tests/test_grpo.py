"""GRPO and RLOO: the group advantages, the clipped token objective, the KL term and every normalisation
against hand-computed values; a tiny policy learns to say "good" under each when a reward function pays for
it; a run killed mid-way resumes to the uninterrupted run's weights; two processes train as one."""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from prospect.engine.factory import make_trainer
from prospect.engine.rollout import GroupTrainer
from prospect.errors import UserError
from prospect.losses import get_loss
from prospect.losses.advantages import group_relative, leave_one_out
from prospect.losses.base import LossInputs, TokenInputs
from prospect.recipe import load_config
from tests.helpers import miniature, tiny_overrides
from tests.test_kill_and_scale import cli, same, torchrun, weights


def test_group_relative_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.1, 0.1, 0.1, 0.1]])
    std = math.sqrt(4 * 0.5**2 / 3)  # unbiased, as TRL's
    scaled = group_relative(rewards, scale=True)
    a = 0.5 / (std + 1e-4)
    assert scaled[0].tolist() == pytest.approx([a, -a, -a, a])
    assert group_relative(rewards, scale=False)[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    for advantages in (scaled, group_relative(rewards, scale=False)):  # equal rewards: exactly 0, never NaN
        assert advantages[1:].tolist() == [[0.0] * 4, [0.0] * 4]


def test_leave_one_out_baseline_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 3.0], [0.1, 0.1, 0.1]])
    # A_i = r_i - mean of the other two
    assert leave_one_out(rewards)[0].tolist() == pytest.approx([1 - 1.5, 0 - 2.0, 3 - 0.5])
    assert leave_one_out(rewards)[1].tolist() == [0.0, 0.0, 0.0]  # (0.3 - 0.1) / 2 is not 0.1 in floats
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.tensor([[1.0]]))


def test_rloo_takes_the_kl_out_of_the_reward_before_the_baseline():
    spec = get_loss("rloo")
    params = spec.make_params({"beta": 0.5}, "test")
    scores, kl = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    assert spec.group_advantages is not None
    assert spec.group_advantages(scores, kl, params).tolist() == [[0.5, -0.5]]  # rewards 0.5 and 0
    assert spec.group_advantages(scores, None, params).tolist() == [[1.0, -1.0]]


def tokens(**extra) -> TokenInputs:
    """Two completions of 3 and 1 tokens (one padded position), both at ratio 1: advantages +1 and -2."""
    logps = torch.tensor(
        [[-1.0, -2.0, -0.5, 0.0], [-3.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True
    )
    values = {
        "logps": logps,
        "old_logps": logps.detach().clone(),
        "advantages": torch.tensor([[1.0] * 4, [-2.0] * 4], dtype=torch.float64),
        "mask": torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]),
        "budget": 5,
    }
    return TokenInputs(**{**values, **extra})


@pytest.mark.parametrize(
    ("loss_type", "per_completion", "units", "normalize"),
    [
        ("grpo", [-1.0, 2.0], 2, "units"),  # mean over each completion's tokens, then over completions
        ("dapo", [-3.0, 2.0], 4, "tokens"),  # every token of the step
        ("bnpo", [-3.0, 2.0], 4, "tokens"),
        ("dr_grpo", [-3.0 / 5, 2.0 / 5], 2, "units"),  # sums over the budget (5 tokens)
        ("sum", [-3.0, 2.0], 2, "units"),  # REINFORCE on sequence log-probs
    ],
)
@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_each_normalisation_by_hand(name, loss_type, per_completion, units, normalize):
    spec = get_loss(name)
    params = spec.make_params({"loss_type": loss_type, "beta": 0.0}, "test")
    assert spec.resolved(params).normalize == normalize  # what the engine divides the summed losses by
    x = tokens()
    out = spec.compute(LossInputs(tokens=x), params)
    assert out.losses.tolist() == pytest.approx(per_completion)
    # At ratio 1 the gradient is REINFORCE's: -A d log pi, scaled as the loss is aggregated.
    (out.losses.sum() / units).backward()
    scale = {"grpo": [1 / 3, 1.0], "dr_grpo": [1 / 5, 1 / 5]}.get(loss_type, [1.0, 1.0])
    expected = [[-1.0 * scale[0] / units] * 3 + [0.0], [2.0 * scale[1] / units, 0.0, 0.0, 0.0]]
    assert x.logps.grad is not None
    assert x.logps.grad.tolist() == [pytest.approx(row) for row in expected]


def test_clipped_ratio_with_a_higher_upper_bound():
    old = torch.zeros(1, 4)
    logps = torch.log(torch.tensor([[1.5, 0.7, 1.5, 0.5]]))
    x = tokens(
        logps=logps, old_logps=old, advantages=torch.tensor([[2.0, 2.0, -1.0, -1.0]]), mask=torch.ones(1, 4)
    )
    spec = get_loss("grpo")
    out = spec.compute(
        LossInputs(tokens=x), spec.make_params({"clip": 0.2, "clip_high": 0.28, "loss_type": "sum"}, "t")
    )
    # max(-A r, -A clip(r, 0.8, 1.28)) per token
    expected = [max(-3.0, -2 * 1.28), max(-1.4, -2 * 0.8), max(1.5, 1.28), max(0.5, 0.8)]
    assert out.losses.tolist() == pytest.approx([sum(expected)])
    total, count = out.means["clip_fraction"]
    assert float(total / count) == 0.5  # the first and last tokens


def test_grpo_kl_term_is_k3_to_the_reference():
    spec = get_loss("grpo")
    params = spec.make_params({"beta": 0.1, "loss_type": "sum"}, "test")
    assert spec.resolved(params).needs_reference and not spec.needs_reference
    reference = torch.tensor([[-1.5, -2.0, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    x = tokens(reference_logps=reference)
    k3 = lambda lp, ref: math.exp(ref - lp) - (ref - lp) - 1  # noqa: E731
    expected = [-3.0 + 0.1 * (k3(-1.0, -1.5) + k3(-2.0, -2.0) + k3(-0.5, 0.0)), 2.0 + 0.1 * k3(-3.0, -2.0)]
    assert spec.compute(LossInputs(tokens=x), params).losses.tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="reference_logps"):
        spec.compute(LossInputs(tokens=tokens()), params)


def test_a_zero_kl_coefficient_needs_no_reference():
    rloo = get_loss("rloo")
    assert rloo.needs_reference and not rloo.resolved(rloo.make_params({"beta": 0}, "t")).needs_reference
    grpo = get_loss("grpo")  # the declarations of the default options: GRPO's beta 0 loads no reference
    assert not grpo.needs_reference and grpo.normalize == "tokens"
    assert rloo.normalize == "units"


def group_options(name: str, **extra) -> dict:
    return {
        "loss.name": name,
        "online.reward_function": "tests.test_ppo:reward_good",  # the number of "good"s
        "online.samples_per_prompt": 4,
        "online.max_new_tokens": 6,
        **extra,
    }


@pytest.mark.parametrize("name", ["grpo", "rloo"])
def test_a_tiny_policy_learns_the_rewarded_word(name, tiny_model_dir, kto_file, tmp_path):
    options = group_options(
        name,
        **{
            "online.samples_per_prompt": 8,  # "good" is rare at first: about one sample in 60
            "loss.epochs": 2,
            "train.batch_size": 6,
            "train.max_steps": 40,
            "train.learning_rate": 3e-3,
            "train.seed": 1,
        },
    )
    run = tmp_path / "run"
    trainer = make_trainer(load_config(None, tiny_overrides(tiny_model_dir, kto_file, run, **options)))
    assert isinstance(trainer, GroupTrainer)
    assert (trainer.live_reference is None) == (name == "grpo")  # GRPO's beta is 0 by default
    trainer.train()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first = sum(line["score"] for line in lines[:5]) / 5
    last = sum(line["score"] for line in lines[-5:]) / 5
    assert first < 0.1 and last > 4.0, (first, last)  # of at most 6 tokens
    for key in (
        "policy_loss",
        "clip_fraction",
        "approx_kl",
        "tied_groups",
        "score_std",
        "sampled_tokens_per_s",
    ):
        assert key in lines[-1]
    assert ("kl" in lines[-1]) == (name == "rloo")


def test_one_update_without_a_reference_skips_the_rollout_forward_and_trains_the_same(
    tiny_model_dir, kto_file, tmp_path, monkeypatch
):
    """GRPO with beta 0 and one update per rollout: the update's own log-probs, detached, stand for the sampling
    policy's, so the rollout's no-grad forward is skipped; the weights after two steps are those with it."""
    options = group_options("grpo", **{"online.reward_function": "tests.test_grpo:reward_characters"})
    options.update({"train.max_steps": 2, "train.batch_size": 2, "train.learning_rate": 1e-3})

    def trained(run: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        config = load_config(None, tiny_overrides(tiny_model_dir, kto_file, tmp_path / run, **options))
        trainer = make_trainer(config)
        model = trainer.accelerator.unwrap_model(trainer.policy)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        trainer.train()
        return before, {k: v.detach().clone() for k, v in model.state_dict().items()}

    forwards = []
    real_forward = GroupTrainer.forward
    monkeypatch.setattr(
        GroupTrainer,
        "forward",
        lambda self, seqs, rollout: forwards.append(rollout) or real_forward(self, seqs, rollout),
    )
    before, skipped = trained("skipped")
    assert forwards == [False, False]  # one update forward per step, no rollout forward
    monkeypatch.setattr(GroupTrainer, "scores_rollout", lambda self: True)
    _, scored = trained("scored")
    assert forwards[2:] == [True, False, True, False]
    for name, value in skipped.items():
        torch.testing.assert_close(value, scored[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(value, before[name]) for name, value in skipped.items())  # it did train


def test_a_group_of_one_is_refused(tiny_model_dir, kto_file, tmp_path):
    options = group_options("rloo", **{"online.samples_per_prompt": 1})
    with pytest.raises(UserError, match=r"online.samples_per_prompt=1: loss 'rloo' compares each sample"):
        make_trainer(load_config(None, tiny_overrides(tiny_model_dir, kto_file, tmp_path / "run", **options)))
    assert not (tmp_path / "run").exists()


def reward_characters(prompt, completion: str) -> float:
    """A dense reward: random completions of 6 tokens differ in length, so no group is tied."""
    return len(completion) / 10


# A dense reward, several updates per rollout (the ratio leaves 1 and clipping can bind), a KL term (the
# reference), and checkpoints every step.
RESUMABLE = {
    "online.reward_function": "tests.test_grpo:reward_characters",
    "loss.beta": 0.05,
    "loss.epochs": 2,
    "train.max_steps": 4,
    "train.batch_size": 2,
    "train.save_every": 1,
}


def test_a_killed_run_resumes_to_the_same_weights(tiny_model_dir, kto_file, tmp_path):
    options = group_options("grpo", **RESUMABLE, **{"loss.minibatches": 2})
    straight = cli(tiny_overrides(tiny_model_dir, kto_file, tmp_path / "straight", **options))
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    args = tiny_overrides(tiny_model_dir, kto_file, run, **options)
    killed = cli(args, env={"PROSPECT_FAULT": "step:3"})
    assert killed.returncode == -signal.SIGKILL
    resumed = cli([*args, "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    assert same(weights(run), weights(tmp_path / "straight"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert all(line["grad_norm"] > 0 and line["tied_groups"] < 1 for line in lines)
    assert max(line["clip_fraction"] for line in lines) > 0


def test_two_processes_train_as_one_accumulating_two(tiny_model_dir, kto_file, tmp_path):
    """Each microbatch is sampled with the seed of its place in the global batch, so 2 processes x 2 prompts
    sample what 1 process x 2 prompts x 2 accumulation steps does, and train to the same weights."""
    options = group_options("rloo", **RESUMABLE)
    one = cli(
        tiny_overrides(tiny_model_dir, kto_file, tmp_path / "one", **options, **{"train.grad_accum": 2})
    )
    assert one.returncode == 0, one.stderr
    two = cli(tiny_overrides(tiny_model_dir, kto_file, tmp_path / "two", **options), launcher=torchrun(2))
    assert two.returncode == 0, two.stderr
    assert "2 x 1 accum x 2 proc MULTI_CPU" in two.stdout
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    metrics = [
        [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    for m1, m2 in zip(*metrics, strict=True):
        assert m1["length"] == m2["length"] and m1["score"] == pytest.approx(
            m2["score"], abs=1e-6
        )  # same samples
        assert m1["kl"] == pytest.approx(m2["kl"], abs=1e-5)
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
        assert m1["grad_norm"] > 0 and (m1["kl"] != 0) == (m1["step"] > 1)  # the policy leaves the reference


@pytest.mark.parametrize("recipe", ["grpo_smollm2_arithmetic", "rloo_smollm2_arithmetic"])
def test_the_arithmetic_recipes_run_in_miniature(recipe, tiny_model_dir, tmp_path):
    """The shipped recipes, on the tiny model: the exact-match verifier reads each prompt's answer field, and
    the held-out accuracy is measured during and after training."""
    overrides = miniature(recipe, tiny_model_dir, tmp_path / "run", **{"online.samples_per_prompt": 2})
    make_trainer(load_config(recipe, overrides)).train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["score"] for line in lines] == [0.0, 0.0]  # the tiny model does not do sums
    evals = [json.loads(x) for x in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2]
