"""Per-example losses of DPO, IPO, KTO and SimPO against TRL's on the same tiny models and batches.

TRL is in the dev extra, so these run with every test run (`make test`, CI): a missing `trl` fails them
rather than skipping them. TRL tokenizes and collates; the same token ids then go through prospect's log-prob
code and losses, so the comparison covers both.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from prospect.data.batching import Sequences
from prospect.losses import get_loss
from prospect.losses.base import LossInputs
from prospect.models.scoring import TokenScorer
from tests.helpers import build_model, paired_rows, unpaired_rows

TOLERANCE = 1e-5
# IPO's losses are about 25 at step 0 ((1/(2 tau))^2 with tau 0.1): fp32 rounding of the summed log-probs
# alone moves them by ~1e-5, so large losses are compared to 1e-6 relative instead.
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """A policy and a different reference (another seed), so the losses are far from their step-0 values."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    reference = build_model(len(tokenizer), seed=1)
    return policy, reference, tokenizer


def sequences(input_ids, attention_mask, completion_mask) -> Sequences:
    rows = torch.arange(input_ids.shape[0]).unsqueeze(1).expand_as(input_ids)
    index = torch.where(attention_mask.bool(), rows, -1)
    return Sequences(input_ids, attention_mask, completion_mask.bool(), index, input_ids.shape[0])


def logps(model, seqs: Sequences, average: bool = False) -> torch.Tensor:
    with torch.no_grad():
        values = TokenScorer(model).sequence_logps(seqs)
    return values / seqs.completion_lengths() if average else values


def ours(name: str, **fields) -> torch.Tensor:
    spec = get_loss(name)
    params = {k: v for k, v in fields.items() if k not in LossInputs.__dataclass_fields__}
    inputs = LossInputs(**{k: v for k, v in fields.items() if k in LossInputs.__dataclass_fields__})
    return spec.compute(inputs, spec.make_params({"name": name, **params}, "test")).losses


def common_args(tmp_path, **extra):
    return {
        "output_dir": str(tmp_path),
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "max_length": 64,
        "remove_unused_columns": False,
        **extra,
    }


@pytest.mark.parametrize(
    ("loss_type", "name", "params"),
    [
        ("sigmoid", "dpo", {"beta": 0.1}),
        ("ipo", "ipo", {"tau": 0.1}),
    ],
)
def test_dpo_and_ipo_match_trl(loss_type, name, params, models, tmp_path):
    from trl import DPOConfig, DPOTrainer

    policy, reference, tokenizer = models
    beta = params.get("beta", params.get("tau"))
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(paired_rows(6)),
        args=DPOConfig(
            **common_args(tmp_path, loss_type=[loss_type], beta=beta, per_device_train_batch_size=1)
        ),
    )
    compared = 0
    for batch in trainer.get_train_dataloader():
        with torch.no_grad():
            expected = trainer._compute_loss(trainer.model, batch, return_outputs=False)
        seqs = sequences(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        got = ours(
            name,
            policy_logps=logps(policy, seqs),
            reference_logps=logps(reference, seqs),
            completion_lengths=seqs.completion_lengths(),
            **params,
        )
        assert got.item() == pytest.approx(expected.item(), abs=TOLERANCE, rel=RELATIVE)
        compared += 1
    assert compared == 6


def test_kto_matches_trl(models, tmp_path, monkeypatch):
    from trl import KTOConfig, KTOTrainer
    from trl.trainer import kto_trainer

    policy, reference, tokenizer = models
    trainer = KTOTrainer(
        model=policy,
        ref_model=reference,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(unpaired_rows(8)),
        args=KTOConfig(
            **common_args(
                tmp_path,
                beta=0.1,
                desirable_weight=1.3,
                undesirable_weight=0.8,
                per_device_train_batch_size=8,
            )
        ),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    # Record TRL's sigmoids: its desirable losses are 1 - s, its undesirable ones 1 - s as well.
    recorded = []
    real_sigmoid = torch.sigmoid

    class Spy:
        def __getattr__(self, item):
            return getattr(torch.nn.functional, item)

        @staticmethod
        def sigmoid(x):
            out = real_sigmoid(x)
            recorded.append(out)
            return out

    monkeypatch.setattr(kto_trainer, "F", Spy())
    with torch.no_grad():
        trainer._compute_loss(trainer.model, batch, return_outputs=False)
    labels = batch["label"].bool()
    expected = torch.cat([1.3 * (1 - recorded[0]), 0.8 * (1 - recorded[1])])

    seqs = sequences(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    kl_seqs = sequences(batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
    kl = (logps(policy, kl_seqs) - logps(reference, kl_seqs)).mean()
    got = ours(
        "kto",
        policy_logps=logps(policy, seqs),
        reference_logps=logps(reference, seqs),
        completion_lengths=seqs.completion_lengths(),
        labels=labels,
        reference_point=kl,
        beta=0.1,
        desirable_weight=1.3,
        undesirable_weight=0.8,
    )
    got = torch.cat([got[labels], got[~labels]])  # TRL's order: desirable first
    assert 0 < labels.sum() < len(labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=TOLERANCE)


def test_simpo_matches_trl(models, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _, tokenizer = models
    trainer = CPOTrainer(
        model=policy,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(paired_rows(6)),
        args=CPOConfig(
            **common_args(
                tmp_path,
                loss_type="simpo",
                beta=2.0,
                simpo_gamma=1.0,
                cpo_alpha=0.0,
                per_device_train_batch_size=6,
            )
        ),
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        chosen, rejected = trainer.concatenated_forward(trainer.model, batch)[:2]
        expected = trainer.cpo_loss(chosen, rejected)[0]
    rows = []
    for side in ("chosen", "rejected"):
        labels = batch[f"{side}_labels"]
        rows.append((batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"], labels != -100))
    width = max(r[0].shape[1] for r in rows)
    padded = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for r in rows for t in r]
    seqs = sequences(
        torch.cat([padded[0], padded[3]]),
        torch.cat([padded[1], padded[4]]),
        torch.cat([padded[2], padded[5]]),
    )
    got = ours(
        "simpo",
        policy_logps=logps(policy, seqs),
        completion_lengths=seqs.completion_lengths(),
        beta=2.0,
        gamma=1.0,
    )
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=TOLERANCE)
