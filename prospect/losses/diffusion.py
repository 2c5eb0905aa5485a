"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", 2023) and
its baseline, supervised fine-tuning on the preferred images.

Diffusion-DPO is DPO with each image's likelihood replaced by its evidence lower bound, which a denoiser
estimates by its denoising error. Both images of a pair are noised with the same noise eps at the same
timestep t (drawn uniformly); each image's error is e = mean over its pixels of (eps - eps_model(x_t, t, c))^2,
under the policy and the reference, and d = e_policy - e_reference says how much worse the policy denoises
it than the reference does. The loss is

    -log sigmoid(-beta / 2 * (d_chosen - d_rejected)),

as the authors' reference code writes it (SalesforceAIResearch/DiffusionDPO, train.py: the error a mean over
pixels, `inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)`, t uniform, beta_dpo 5000 for Stable
Diffusion 1.5). The engine supplies the errors (`LossInputs.policy_errors`, `reference_errors`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from prospect.losses.base import LossInputs, LossOutput, LossSpec, chosen_rejected, mean_of
from prospect.options import POSITIVE, opt


@dataclass
class DiffusionDPOParams:
    beta: float = opt(
        5000.0,
        "beta: higher keeps the denoiser closer to the reference. The errors are means over pixels, so beta "
        "is large (5000 for Stable Diffusion 1.5 in the paper's code).",
        bounds=POSITIVE,
    )


@dataclass
class DiffusionSFTParams:
    pass


def diffusion_dpo_loss(x: LossInputs, p: DiffusionDPOParams) -> LossOutput:
    """-log sigmoid(-beta/2 * (d_c - d_r)), d the policy's denoising error minus the reference's, at a shared
    noise and timestep (Diffusion-DPO, Wallace et al.)."""
    error_c, error_r = chosen_rejected(x.require("policy_errors"))
    reference_c, reference_r = chosen_rejected(x.require("reference_errors"))
    d_c, d_r = error_c - reference_c, error_r - reference_r  # how much worse the policy denoises each image
    logits = -0.5 * p.beta * (d_c - d_r)
    metrics = {
        "rewards/margin": mean_of(logits),
        "rewards/accuracy": mean_of((logits > 0).float()),  # the paper's implicit accuracy
        "gap": mean_of(d_c - d_r),
        "error/chosen": mean_of(error_c),
        "error/rejected": mean_of(error_r),
        "reference_error/chosen": mean_of(reference_c),
        "reference_error/rejected": mean_of(reference_r),
    }
    return LossOutput(-F.logsigmoid(logits), metrics, {})


def diffusion_sft_loss(x: LossInputs, p: DiffusionSFTParams) -> LossOutput:
    """Each image's denoising error: the mean squared error of the predicted noise (the plain diffusion loss,
    on the preferred images only when given pairs)."""
    errors = x.require("policy_errors")
    return LossOutput(errors, {"error": mean_of(errors)}, {})


SPECS = [
    LossSpec(
        "diffusion_dpo",
        diffusion_dpo_loss,
        DiffusionDPOParams,
        "paired",
        needs_reference=True,
        loop="diffusion",
    ),
    LossSpec(
        "diffusion_sft",
        diffusion_sft_loss,
        DiffusionSFTParams,
        "completions",
        needs_reference=False,
        loop="diffusion",
    ),
]
