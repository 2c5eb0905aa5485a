"""Every offline loss against its formula, written out independently here with math on floats."""

from __future__ import annotations

import math

import pytest
import torch

from prospect.errors import UserError
from prospect.losses import LOSSES, get_loss
from prospect.losses.base import LossInputs


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Two pairs: summed log-probs of chosen (c) and rejected (r) completions under policy and reference.
POLICY_C, POLICY_R = [-10.0, -22.0], [-14.0, -20.5]
REF_C, REF_R = [-11.0, -21.0], [-12.5, -21.5]
LEN_C, LEN_R = [5.0, 11.0], [7.0, 9.0]


def pair_inputs(policy_c=POLICY_C, policy_r=POLICY_R, ref_c=REF_C, ref_r=REF_R, len_c=LEN_C, len_r=LEN_R):
    return LossInputs(
        policy_logps=torch.tensor(policy_c + policy_r, dtype=torch.float64, requires_grad=True),
        completion_lengths=torch.tensor(len_c + len_r, dtype=torch.float64),
        reference_logps=torch.tensor(ref_c + ref_r, dtype=torch.float64),
    )


def compute(name: str, inputs: LossInputs, **params) -> torch.Tensor:
    spec = get_loss(name)
    return spec.compute(inputs, spec.make_params({"name": name, **params}, "test")).losses


def margins(beta=1.0):
    return [beta * ((pc - rc) - (pr - rr)) for pc, pr, rc, rr in zip(POLICY_C, POLICY_R, REF_C, REF_R)]


def test_every_registered_loss_is_tested_here():
    here = {"kto", "dpo", "cdpo", "robust_dpo", "ipo", "hinge", "slic", "simpo", "orpo", "sft", "csft"}
    here |= {"diffusion_dpo", "diffusion_sft"}
    elsewhere = {"reward_bt", "reward_margin", "reward_regression", "ppo"}  # test_reward.py, test_ppo.py
    elsewhere |= {"grpo", "rloo"}  # test_grpo.py
    elsewhere |= {"kto_zero", "kto_logsigmoid"}  # test_kto_loss.py
    elsewhere |= {"preference", "nash_md"}  # test_preference_model.py, test_nash.py
    tested = here | elsewhere
    assert set(LOSSES) == tested


@pytest.mark.parametrize("name", ["dpo", "cdpo", "robust_dpo"])
def test_dpo_family_is_ln2_at_step_zero(name):
    same = pair_inputs(POLICY_C, POLICY_R, POLICY_C, POLICY_R)
    assert compute(name, same).tolist() == pytest.approx([math.log(2)] * 2)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_formula(beta):
    expected = [-log_sigmoid(z) for z in margins(beta)]
    assert compute("dpo", pair_inputs(), beta=beta).tolist() == pytest.approx(expected, rel=1e-12)


def test_cdpo_and_robust_match_formula():
    eps, beta = 0.2, 0.3
    z = margins(beta)
    cdpo = [(1 - eps) * -log_sigmoid(m) + eps * -log_sigmoid(-m) for m in z]
    robust = [((1 - eps) * -log_sigmoid(m) - eps * -log_sigmoid(-m)) / (1 - 2 * eps) for m in z]
    assert compute("cdpo", pair_inputs(), beta=beta, label_smoothing=eps).tolist() == pytest.approx(cdpo)
    assert compute("dpo", pair_inputs(), beta=beta, label_smoothing=eps).tolist() == pytest.approx(cdpo)
    assert compute("robust_dpo", pair_inputs(), beta=beta, label_smoothing=eps).tolist() == pytest.approx(
        robust
    )


def test_label_smoothing_must_stay_below_half():
    with pytest.raises(UserError, match=r"test.label_smoothing: expected a number in \[0, 0.5\), got 0.5"):
        get_loss("robust_dpo").make_params({"label_smoothing": 0.5}, "test")


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    x = pair_inputs()
    compute("dpo", x).sum().backward()
    grad = x.policy_logps.grad
    assert (grad[:2] < 0).all() and (grad[2:] > 0).all()  # descending the loss raises chosen log-probs


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ipo_matches_formula(tau):
    same = pair_inputs(POLICY_C, POLICY_R, POLICY_C, POLICY_R)
    assert compute("ipo", same, tau=tau).tolist() == pytest.approx([(1 / (2 * tau)) ** 2] * 2)
    expected = [
        ((pc - rc) / lc - (pr - rr) / lr - 1 / (2 * tau)) ** 2
        for pc, pr, rc, rr, lc, lr in zip(POLICY_C, POLICY_R, REF_C, REF_R, LEN_C, LEN_R)
    ]
    assert compute("ipo", pair_inputs(), tau=tau).tolist() == pytest.approx(expected, rel=1e-12)


def test_hinge_matches_formula():
    expected = [max(0.0, 1 - m) for m in margins(0.4)]
    assert compute("hinge", pair_inputs(), beta=0.4).tolist() == pytest.approx(expected)
    same = pair_inputs(POLICY_C, POLICY_R, POLICY_C, POLICY_R)
    assert compute("hinge", same).tolist() == [1.0, 1.0]


def test_slic_matches_formula_and_ignores_the_reference():
    expected = [max(0.0, 1.5 - pc + pr) + 0.2 * -pc for pc, pr in zip(POLICY_C, POLICY_R)]
    x = pair_inputs()
    x.reference_logps = None
    assert compute("slic", x, delta=1.5, lam=0.2).tolist() == pytest.approx(expected)


def test_simpo_matches_formula_and_ignores_the_reference():
    beta, gamma = 2.5, 1.4
    expected = [
        -log_sigmoid(beta * (pc / lc - pr / lr) - gamma)
        for pc, pr, lc, lr in zip(POLICY_C, POLICY_R, LEN_C, LEN_R)
    ]
    x = pair_inputs()
    x.reference_logps = None
    assert compute("simpo", x, beta=beta, gamma=gamma).tolist() == pytest.approx(expected, rel=1e-12)


def test_orpo_matches_formula():
    lam = 0.3

    def log_odds(avg):
        p = math.exp(avg)
        return math.log(p / (1 - p))

    expected = []
    for pc, pr, lc, lr in zip(POLICY_C, POLICY_R, LEN_C, LEN_R):
        ratio = log_odds(pc / lc) - log_odds(pr / lr)
        expected.append(-pc / lc - lam * log_sigmoid(ratio))
    x = pair_inputs()
    x.reference_logps = None
    assert compute("orpo", x, lam=lam).tolist() == pytest.approx(expected, rel=1e-10)


def test_orpo_log_odds_are_stable_near_probability_one():
    x = pair_inputs([-1e-6, -1e-7], [-3.0, -4.0], len_c=[1.0, 1.0], len_r=[1.0, 1.0])
    x.reference_logps = None
    losses = compute("orpo", x)
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("name", ["sft", "csft"])
def test_sft_is_the_summed_nll_per_sequence(name):
    x = LossInputs(policy_logps=torch.tensor([-3.0, -7.5]), completion_lengths=torch.tensor([2.0, 5.0]))
    assert compute(name, x).tolist() == [3.0, 7.5]
    assert get_loss(name).normalize == "tokens"  # the engine divides by completion tokens: token-mean NLL


# Two pairs of images: denoising errors (mean squared error of the predicted noise) of the chosen (c) and
# rejected (r) image under the policy and the reference, at a shared noise and timestep.
ERRORS_C, ERRORS_R = [0.30, 0.52], [0.41, 0.47]
REF_ERRORS_C, REF_ERRORS_R = [0.32, 0.50], [0.40, 0.49]


def error_inputs() -> LossInputs:
    return LossInputs(
        policy_errors=torch.tensor(ERRORS_C + ERRORS_R, dtype=torch.float64, requires_grad=True),
        reference_errors=torch.tensor(REF_ERRORS_C + REF_ERRORS_R, dtype=torch.float64),
    )


@pytest.mark.parametrize("beta", [1.0, 5000.0])
def test_diffusion_dpo_matches_formula(beta):
    """-log sigmoid(-beta/2 * ((e_c - ref_c) - (e_r - ref_r))) (Wallace et al.; the authors' inside_term)."""
    inside = [
        -0.5 * beta * ((ec - rc) - (er - rr))
        for ec, er, rc, rr in zip(ERRORS_C, ERRORS_R, REF_ERRORS_C, REF_ERRORS_R)
    ]
    assert compute("diffusion_dpo", error_inputs(), beta=beta).tolist() == pytest.approx(
        [-log_sigmoid(z) for z in inside], rel=1e-9
    )


def test_diffusion_dpo_metrics_and_its_start():
    spec = get_loss("diffusion_dpo")
    params = spec.make_params({"name": "diffusion_dpo", "beta": 100.0}, "test")
    out = spec.compute(error_inputs(), params)
    total, count = out.means["gap"]
    assert float(total / count) == pytest.approx(((-0.02 - 0.01) + (0.02 + 0.02)) / 2)  # d_c - d_r per pair
    accuracy, n = out.means["rewards/accuracy"]
    assert float(accuracy / n) == 0.5  # the first pair's chosen image gained, the second's lost
    same = LossInputs(
        policy_errors=error_inputs().reference_errors, reference_errors=error_inputs().reference_errors
    )
    assert spec.compute(same, params).losses.tolist() == pytest.approx([math.log(2)] * 2)


def test_diffusion_sft_is_the_denoising_error():
    out = get_loss("diffusion_sft").compute(error_inputs(), None)
    assert out.losses.tolist() == pytest.approx(ERRORS_C + ERRORS_R)
