"""KTO against the paper's formula, written out independently here with math on plain floats."""

from __future__ import annotations

import math

import pytest
import torch

from prospect.errors import UserError
from prospect.losses.base import LossInputs
from prospect.losses.kto import KTOParams, check_balance, kto_logsigmoid_loss, kto_loss, kto_zero_loss


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def by_hand(policy, reference, labels, kl, beta, lam_d, lam_u):
    z = max(kl, 0.0)
    out = []
    for p, r, d in zip(policy, reference, labels):
        reward = p - r
        out.append(
            lam_d * (1 - sigmoid(beta * (reward - z))) if d else lam_u * (1 - sigmoid(beta * (z - reward)))
        )
    return out


def inputs(policy, reference, labels, kl):
    return LossInputs(
        policy_logps=torch.tensor(policy, dtype=torch.float64, requires_grad=True),
        completion_lengths=torch.ones(len(policy)),
        reference_logps=torch.tensor(reference, dtype=torch.float64),
        labels=torch.tensor(labels),
        reference_point=torch.tensor(kl, dtype=torch.float64),
    )


def test_step_zero_is_half_lambda():
    """policy == reference and KL 0: every example loses exactly 0.5 * its lambda."""
    logps = [-12.0, -30.5, -7.25, -19.0]
    out = kto_loss(
        inputs(logps, logps, [True, False, True, False], 0.0),
        KTOParams(beta=0.1, desirable_weight=1.5, undesirable_weight=0.8),
    )
    assert out.losses.tolist() == [0.75, 0.4, 0.75, 0.4]


@pytest.mark.parametrize("kl", [0.0, 0.37, 2.0])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_formula(kl, beta):
    policy = [-10.0, -12.5, -8.0, -20.0, -3.0]
    reference = [-11.0, -12.0, -9.5, -18.0, -3.0]
    labels = [True, True, False, False, True]
    out = kto_loss(
        inputs(policy, reference, labels, kl),
        KTOParams(beta=beta, desirable_weight=1.3, undesirable_weight=0.7),
    )
    expected = by_hand(policy, reference, labels, kl, beta, 1.3, 0.7)
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_negative_kl_is_clamped_to_zero():
    policy, reference, labels = [-10.0, -9.0], [-10.5, -8.0], [True, False]
    clamped = kto_loss(inputs(policy, reference, labels, -3.0), KTOParams()).losses
    at_zero = kto_loss(inputs(policy, reference, labels, 0.0), KTOParams()).losses
    assert torch.equal(clamped, at_zero)
    assert clamped.tolist() == pytest.approx(by_hand(policy, reference, labels, 0.0, 0.1, 1, 1))


def test_gradient_flows_through_policy_only():
    x = inputs([-10.0, -9.0], [-10.5, -8.0], [True, False], 0.4)
    x.reference_point.requires_grad_(True)
    kto_loss(x, KTOParams(beta=0.2)).losses.sum().backward()
    assert x.reference_point.grad is None  # the reference point is detached
    # d/dp of 1 - sigmoid(b(p - r - z)) is -b s (1 - s); of 1 - sigmoid(b(z - p + r)) is +b s (1 - s).
    s_d = sigmoid(0.2 * (0.5 - 0.4))
    s_u = sigmoid(0.2 * (0.4 + 1.0))
    assert x.policy_logps.grad.tolist() == pytest.approx([-0.2 * s_d * (1 - s_d), 0.2 * s_u * (1 - s_u)])


def test_metrics_split_by_label():
    out = kto_loss(
        inputs([-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0], [True, False, False], 0.0), KTOParams(beta=0.5)
    )
    total, count = out.means["rewards/desirable"]
    assert (total / count).item() == pytest.approx(0.5)
    total, count = out.means["rewards/undesirable"]
    assert (total / count).item() == pytest.approx(-0.25)
    assert out.totals["count/undesirable"].item() == 2


def test_empty_label_group_gives_no_nan():
    out = kto_loss(inputs([-1.0, -2.0], [-1.0, -2.0], [True, True], 0.0), KTOParams())
    assert torch.isfinite(out.losses).all()
    assert out.means["rewards/undesirable"][1].item() == 0  # count 0, so the step average skips it


def test_balance_rule():
    assert check_balance(KTOParams(), {"desirable": 100, "undesirable": 90}) == (KTOParams(), [])
    _, (warning,) = check_balance(KTOParams(), {"desirable": 50, "undesirable": 100})
    assert (
        "0.500" in warning
        and "loss.desirable_weight=2" in warning
        and "loss.undesirable_weight=0.5" in warning
    )
    _, (warning,) = check_balance(KTOParams(), {"desirable": 200, "undesirable": 100})
    assert "loss.desirable_weight=0.667" in warning


def test_auto_weights_apply_the_rule():
    params, _ = check_balance(
        KTOParams(auto_weights=True, undesirable_weight=1.5), {"desirable": 30, "undesirable": 90}
    )
    assert params.desirable_weight == pytest.approx(4.5)  # 4.5 * 30 / (1.5 * 90) = 1
    assert check_balance(params, {"desirable": 30, "undesirable": 90})[1]  # the note says what was set


def test_single_class_is_an_error():
    with pytest.raises(UserError, match="no undesirable ones"):
        check_balance(KTOParams(), {"desirable": 10, "undesirable": 0})


def test_kto_zero_holds_the_reference_point_at_zero():
    """HALOs' KTO-zero ablation: z = 0 whatever the batch's KL, so no KL batch is needed."""
    policy, reference, labels = (
        [-10.0, -12.5, -8.0, -20.0],
        [-11.0, -12.0, -9.5, -18.0],
        [True, True, False, False],
    )
    x = inputs(policy, reference, labels, 0.0)
    x.reference_point = None  # the engine supplies none: the spec declares no reference point
    out = kto_zero_loss(x, KTOParams(beta=0.3, desirable_weight=1.2, undesirable_weight=0.9))
    assert out.losses.tolist() == pytest.approx(
        by_hand(policy, reference, labels, 0.0, 0.3, 1.2, 0.9), rel=1e-12
    )


@pytest.mark.parametrize("kl", [-1.0, 0.0, 0.8])
def test_kto_logsigmoid_matches_formula(kl):
    """-lambda log sigmoid(beta (r - z)) for desirable, -lambda log sigmoid(beta (z - r)) otherwise, z = max(kl, 0)."""
    policy, reference, labels = (
        [-10.0, -12.5, -8.0, -20.0],
        [-11.0, -12.0, -9.5, -18.0],
        [True, False, True, False],
    )
    beta, lam_d, lam_u, z = 0.4, 1.1, 0.6, max(kl, 0.0)
    expected = [
        lam_d * -math.log(sigmoid(beta * (p - r - z)))
        if d
        else lam_u * -math.log(sigmoid(beta * (z - p + r)))
        for p, r, d in zip(policy, reference, labels)
    ]
    out = kto_logsigmoid_loss(
        inputs(policy, reference, labels, kl),
        KTOParams(beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u),
    )
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
