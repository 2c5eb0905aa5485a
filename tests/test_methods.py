"""Every method on the one engine, on the tiny model: the policy moves the right way."""

from __future__ import annotations

import pytest
import torch

from prospect.data.shapes import make_batch
from prospect.engine.trainer import Trainer
from prospect.recipe import load_config
from tests.helpers import paired_rows, tiny_overrides, unpaired_rows, write_jsonl

PAIRED = ["dpo", "cdpo", "robust_dpo", "ipo", "hinge", "slic", "simpo", "orpo"]


def trainer_for(tiny_model_dir, data, out, loss: str, **extra) -> Trainer:
    options = {"loss.name": loss, "train.max_steps": 25, **extra}
    return Trainer(load_config(None, tiny_overrides(tiny_model_dir, data, out, **options)))


def policy_logps(trainer: Trainer, seqs) -> torch.Tensor:
    with torch.no_grad():
        return trainer.accelerator.unwrap_model(trainer.policy).sequence_logps(seqs.to(trainer.device))


def pair_margin(trainer: Trainer) -> float:
    batch = make_batch(trainer.data.items, "paired", trainer.tokenizer.pad_token_id)
    logps = policy_logps(trainer, batch.sequences)
    half = len(trainer.data.items)
    return (logps[:half] - logps[half:]).mean().item()


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", paired_rows(24))


@pytest.mark.parametrize("loss", PAIRED)
def test_pairwise_losses_widen_the_chosen_margin(loss, tiny_model_dir, pairs_file, tmp_path):
    trainer = trainer_for(tiny_model_dir, pairs_file, tmp_path / loss, loss)
    before = pair_margin(trainer)
    trainer.train()
    after = pair_margin(trainer)
    assert after > before + 2.0, (before, after)
    if loss in ("simpo", "orpo", "slic"):
        assert trainer.reference_forwards == 0  # reference-free losses never run a reference


def test_sft_lowers_the_nll(tiny_model_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "demos.jsonl",
        [{"prompt": r["prompt"], "completion": r["completion"]} for r in unpaired_rows(24)],
    )
    trainer = trainer_for(tiny_model_dir, data, tmp_path / "sft", "sft", **{"train.padding_free": True})
    batch = make_batch(trainer.data.items, "unpaired", trainer.tokenizer.pad_token_id)
    tokens = batch.sequences.completion_tokens
    before = -policy_logps(trainer, batch.sequences).sum().item() / tokens
    trainer.train()
    after = -policy_logps(trainer, batch.sequences).sum().item() / tokens
    assert after < before - 1.0, (before, after)
    first = trainer.run_dir / "metrics.jsonl"
    import json

    step1 = json.loads(first.read_text().splitlines()[0])
    assert step1["loss"] == pytest.approx(before, rel=0.05)  # the logged loss is the token-mean NLL


def test_csft_conditions_on_control_tokens(tiny_model_dir, pairs_file, tmp_path):
    """Every prompt has a good and a bad completion, so only the control token tells them apart."""
    options = {"train.max_steps": 150, "train.learning_rate": 3e-3, "train.batch_size": 8}
    trainer = trainer_for(tiny_model_dir, pairs_file, tmp_path / "csft", "csft", **options)
    good, bad = (trainer.tokenizer.convert_tokens_to_ids(t) for t in ("<|good|>", "<|bad|>"))
    assert all(item.prompt_ids[-1] == (good if item.label else bad) for item in trainer.data.items)
    final = trainer.train()
    desirable = [i for i in trainer.data.items if i.label]
    as_good = make_batch(desirable, "unpaired", trainer.tokenizer.pad_token_id)
    swapped = [type(i)([*i.prompt_ids[:-1], bad], i.completion_ids, i.label, i.location) for i in desirable]
    as_bad = make_batch(swapped, "unpaired", trainer.tokenizer.pad_token_id)
    # A desirable completion is more likely after <|good|> than after <|bad|>.
    assert (policy_logps(trainer, as_good.sequences) - policy_logps(trainer, as_bad.sequences)).mean() > 1.0
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(final)
    assert saved("<|good|>", add_special_tokens=False)["input_ids"] == [good]


@pytest.mark.parametrize("mode", ["one", "chosen_rejected_fractions"])
def test_kto_variants_from_pairs(mode, tiny_model_dir, pairs_file, tmp_path):
    extra = (
        {"data.unpaired_from_pairs": "one"}
        if mode == "one"
        else {"data.desirable_fraction": 0.5, "loss.auto_weights": True}
    )
    trainer = trainer_for(tiny_model_dir, pairs_file, tmp_path / mode, "kto", **extra)
    counts = trainer.data.counts
    if mode == "one":  # one completion per prompt: 24 pairs -> 24 examples
        assert counts["desirable"] + counts["undesirable"] == 24
        assert len({(*tuple(i.prompt_ids), i.location) for i in trainer.data.items}) == 24
    else:
        assert counts == {"desirable": 12, "undesirable": 24}
        assert trainer.params.desirable_weight == pytest.approx(2.0)
