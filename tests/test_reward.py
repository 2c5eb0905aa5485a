"""Reward models: losses against hand-computed values, scores equal to plain transformers', training, and
`prospect score`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prospect.cli import main
from prospect.config import ModelConfig
from prospect.data.batching import pad
from prospect.engine.trainer import Trainer
from prospect.losses import get_loss
from prospect.losses.base import LossInputs
from prospect.models.scalar_head import ScalarScorer, last_token_positions, load_reward_model, score_head
from prospect.recipe import load_config
from tests.helpers import paired_rows, tiny_overrides, write_jsonl


def nls(x: float) -> float:  # -log sigmoid(x)
    return math.log1p(math.exp(-x))


def compute(name, scores, groups, targets=None, **params):
    spec = get_loss(name)
    inputs = LossInputs(
        scores=torch.tensor(scores, dtype=torch.float64),
        group_index=torch.tensor(groups),
        targets=None if targets is None else torch.tensor(targets, dtype=torch.float64),
    )
    return spec.compute(inputs, spec.make_params({"name": name, **params}, "test"))


def test_bradley_terry_on_pairs_and_a_ranked_list():
    # list 0: a pair (2.0 > 0.5); list 1: a ranked list of three, best first (1.0 > 3.0 > -1.0)
    out = compute("reward_bt", [2.0, 0.5, 1.0, 3.0, -1.0], [0, 0, 1, 1, 1])
    ranked = (nls(1.0 - 3.0) + nls(1.0 + 1.0) + nls(3.0 + 1.0)) / 3  # each of C(3,2) pairs weighted 1/3
    assert out.losses.tolist() == pytest.approx([nls(1.5), ranked])
    total, count = out.means["accuracy"]
    assert (total / count).item() == pytest.approx(3 / 4)
    assert out.totals["comparisons"].item() == 4


def test_llama2_margin_and_centering():
    out = compute("reward_margin", [2.0, 0.5], [0, 0], targets=[3.0, 1.0], margin_scale=0.5)
    assert out.losses.item() == pytest.approx(nls(1.5 - 0.5 * 2.0))
    plain = compute("reward_margin", [2.0, 0.5], [0, 0])  # no scores: margin 0
    assert plain.losses.item() == pytest.approx(nls(1.5))
    centered = compute("reward_bt", [2.0, 0.5], [0, 0], center=0.01)
    assert centered.losses.item() == pytest.approx(nls(1.5) + 0.01 * 2.5**2)


def test_regression():
    out = compute("reward_regression", [0.5, -1.0], [0, 1], targets=[1.5, -0.5])
    assert out.losses.tolist() == pytest.approx([1.0, 0.25])


def test_last_token_is_the_last_non_pad_token():
    seqs = pad([[5, 6], [5]], [[7, 2], [8, 9, 10]], pad_id=2)  # the first one ends with the pad (= EOS) token
    assert last_token_positions(seqs, pad_id=2).tolist() == [2, seqs.input_ids.shape[1] + 3]
    assert last_token_positions(seqs, pad_id=None).tolist() == [3, seqs.input_ids.shape[1] + 3]


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", paired_rows(24))


def test_scores_equal_plain_transformers(tiny_model_dir, tmp_path):
    model, tokenizer = load_reward_model(ModelConfig(name=str(tiny_model_dir)))
    assert model.num_labels == 1
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    seqs = pad([[5, 6, 7], [5, 6]], [[8, 9], [11, 12, 13, 14]], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        ours = ScalarScorer(model, score_head(model)).sequence_scores(seqs, tokenizer.pad_token_id)
        theirs = plain(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs)


def test_reward_model_learns_the_preferences(tiny_model_dir, pairs_file, tmp_path, capsys):
    held_out = write_jsonl(tmp_path / "held_out.jsonl", paired_rows(12))
    overrides = tiny_overrides(
        tiny_model_dir,
        pairs_file,
        tmp_path / "rm",
        **{
            "loss.name": "reward_bt",
            "train.max_steps": 30,
            "data.eval": str(held_out),
            "data.eval_split": "train",
            "eval.num_prompts": 12,
        },
    )
    trainer = Trainer(load_config(None, overrides))
    final = trainer.train()
    done = capsys.readouterr().out.strip().splitlines()[-1]
    assert "report.json" not in done and "report.html" in done  # only the files it wrote
    assert not (tmp_path / "rm" / "report.json").exists() and (tmp_path / "rm" / "report.html").is_file()
    after = json.loads((tmp_path / "rm" / "eval_after.json").read_text())
    before = json.loads((tmp_path / "rm" / "eval_before.json").read_text())
    assert after["pair_accuracy"] == 1.0 and after["comparisons"] == 12
    assert before["pair_accuracy"] < 1.0
    # The saved model is a plain sequence classifier that prefers the chosen completions.
    model = AutoModelForSequenceClassification.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    row = paired_rows(1)[0]
    texts = [row["prompt"] + " " + row[side] + tokenizer.eos_token for side in ("chosen", "rejected")]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        chosen, rejected = model(**batch).logits.squeeze(-1).tolist()
    assert chosen > rejected

    out = tmp_path / "scores.jsonl"
    data = write_jsonl(
        tmp_path / "to_score.jsonl",
        [{"prompt": row["prompt"], "completion": row[s]} for s in ("chosen", "rejected")],
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--model", str(final), "--data", str(data), "--output", str(out)])
    assert exit_info.value.code == 0
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert scored[0]["completion"] == row["chosen"] and scored[0]["score"] > scored[1]["score"]
    with pytest.raises(SystemExit) as exit_info:
        main(["score", "--model", str(final), "--data", str(data), "--output", str(out)])
    assert exit_info.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err


def test_regression_fits_ratings(tiny_model_dir, tmp_path):
    rows = [
        {"prompt": r["prompt"], "completion": r[side], "rating": 1.0 if side == "chosen" else -1.0}
        for r in paired_rows(24)
        for side in ("chosen", "rejected")
    ]
    data = write_jsonl(tmp_path / "rated.jsonl", rows)
    overrides = tiny_overrides(
        tiny_model_dir,
        data,
        tmp_path / "reg",
        **{"loss.name": "reward_regression", "train.max_steps": 40, "train.batch_size": 8},
    )
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    lines = [json.loads(line) for line in (tmp_path / "reg" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["mse"] < 0.2 < lines[0]["mse"]
