"""Raters' disagreement used in training: each example's or pair's agreement computed from the raw ratings
or votes by hand, the filter, per-pair epsilon in cDPO / robust DPO and agreement weights in KTO against
hand-computed losses, and the agreement reaching the loss in a real training step."""

from __future__ import annotations

import dataclasses
import json
import math
import zlib

import pytest
import torch

from prospect.config import DataConfig
from prospect.data.convert import labelled, to_pairs, to_unpaired
from prospect.data.formats import Example, parse_paired, parse_rows
from prospect.data.row import Row
from prospect.data.splits import training_data
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.losses import get_loss
from prospect.losses.base import LossInputs
from prospect.recipe import load_config
from tests.helpers import tiny_overrides, write_jsonl


def rated(prompt: str, text: str, ratings: list[int]) -> Example:
    mean = sum(ratings) / len(ratings)
    return Example(prompt, text, None, f"f:{text}", mean, {"ratings": ratings})


def test_a_label_agreement_is_the_share_of_raters_on_its_side():
    cfg = DataConfig()
    good = labelled(rated("p", "a", [3, 1, 0, -1]), cfg)  # mean 0.75: desirable
    bad = labelled(rated("p", "b", [-3, -2, 1]), cfg)  # mean -1.33: undesirable
    assert (good.label, good.agreement) == (True, (1 + 1 + 0.5 + 0) / 4)
    assert (bad.label, bad.agreement) == (False, 2 / 3)
    assert labelled(Example("p", "c", None, "f", 2.0, {}), cfg).agreement is None  # no raw ratings


def test_a_pair_agreement_is_the_share_of_rater_comparisons_chosen_wins():
    cfg = DataConfig(pair_min_gap=1.0)
    pairs = to_pairs("rated", [rated("p", "hi", [2, 3]), rated("p", "lo", [0, 2])], cfg, 0)
    (pair,) = pairs
    assert (pair.chosen, pair.agreement) == ("hi", (1 + 0.5 + 1 + 1) / 4)
    examples = to_unpaired("paired", pairs, cfg, 0)  # both sides carry the pair's agreement
    assert {e.agreement for e in examples} == {0.875}


def test_votes_and_agreement_fields_of_pair_rows():
    votes = parse_paired(
        Row(
            "f.jsonl:3",
            {"prompt": "p", "chosen": "a", "rejected": "b", "votes_chosen": 3, "votes_rejected": 1},
        )
    )
    assert votes.agreement == 0.75
    given = parse_paired(Row("f.jsonl:4", {"prompt": "p", "chosen": "a", "rejected": "b", "agreement": 0.6}))
    assert given.agreement == 0.6
    for values, expected in [
        ({"votes_chosen": 3}, r"f.jsonl:5: field 'votes_rejected': expected a count of votes"),
        (
            {"votes_chosen": -1, "votes_rejected": 2},
            r"f.jsonl:5: field 'votes_chosen': expected a count of votes >= 0",
        ),
        (
            {"votes_chosen": 0, "votes_rejected": 0},
            r"f.jsonl:5: field 'votes_chosen': expected at least one vote",
        ),
        (
            {"agreement": 1.5},
            r"f.jsonl:5: field 'agreement': expected a share of raters in \[0, 1\], got 1.5",
        ),
    ]:
        with pytest.raises(UserError, match=expected):
            parse_paired(Row("f.jsonl:5", {"prompt": "p", "chosen": "a", "rejected": "b", **values}))
    kind, (example,) = parse_rows(
        [Row("g:1", {"prompt": "p", "completion": "c", "label": True, "agreement": 0.9})], "auto"
    )
    assert (kind, example.agreement) == ("unpaired", 0.9)


def test_min_agreement_drops_what_raters_disagree_on():
    rows = [rated("p", "a", [3, 3, 3]), rated("p", "b", [2, 1, -1, -1, 3]), rated("q", "c", [-2, -2])]
    cfg = DataConfig(min_agreement=0.7)
    kept = to_unpaired("rated", rows, cfg, 0)
    assert sorted(e.completion for e in kept) == ["a", "c"]  # b: 3 of 5 raters on its side
    with pytest.raises(UserError, match=r"data.min_agreement=1 leaves no example"):
        to_unpaired("rated", rows[1:2], DataConfig(min_agreement=1.0), 0)


def dpo_inputs(agreement: list[float]) -> LossInputs:
    policy = torch.tensor([-1.0, -2.0, -3.0, -2.5, -1.5, -2.0], dtype=torch.float64)  # 3 chosen, 3 rejected
    reference = torch.tensor([-1.5, -2.0, -2.0, -2.0, -2.0, -1.0], dtype=torch.float64)
    return LossInputs(
        policy_logps=policy,
        reference_logps=reference,
        completion_lengths=torch.ones(6, dtype=torch.float64),
        agreement=torch.tensor(agreement, dtype=torch.float64),
    )


@pytest.mark.parametrize("robust", [False, True])
def test_per_pair_epsilon_by_hand(robust):
    spec = get_loss("robust_dpo" if robust else "cdpo")
    params = spec.make_params({"beta": 0.5, "label_smoothing": 0.1, "epsilon_from_raters": True}, "t")
    x = dpo_inputs([0.8, math.nan, 0.3])  # pair 3: 70% of raters preferred its rejected side
    out = spec.compute(x, params).losses
    margins = [
        0.5 * ((-1.0 + 1.5) - (-2.5 + 2.0)),
        0.5 * ((-2.0 + 2.0) - (-1.5 + 2.0)),
        0.5 * ((-3.0 + 2.0) - (-2.0 + 1.0)),
    ]
    expected = []
    for m, eps in zip(margins, [0.2, 0.1, 0.45 if robust else 0.7]):  # NaN: the global 0.1; robust caps 0.7
        right, flipped = math.log1p(math.exp(-m)), math.log1p(math.exp(m))
        value = (
            ((1 - eps) * right - eps * flipped) / (1 - 2 * eps)
            if robust
            else (1 - eps) * right + eps * flipped
        )
        expected.append(value)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    global_eps = spec.compute(x, dataclasses.replace(params, epsilon_from_raters=False)).losses
    assert not torch.allclose(out, global_eps)


def test_kto_agreement_weights_by_hand():
    spec = get_loss("kto_zero")
    x = LossInputs(
        policy_logps=torch.tensor([-1.0, -2.0, -3.0], dtype=torch.float64),
        reference_logps=torch.tensor([-2.0, -2.0, -2.0], dtype=torch.float64),
        labels=torch.tensor([True, False, True]),
        agreement=torch.tensor([0.9, 0.6, math.nan], dtype=torch.float64),
    )
    plain = spec.compute(x, spec.make_params({"beta": 1.0}, "t")).losses
    weighted = spec.compute(x, spec.make_params({"beta": 1.0, "agreement_weights": True}, "t")).losses
    torch.testing.assert_close(weighted, plain * torch.tensor([0.9, 0.6, 1.0], dtype=torch.float64))


def test_each_pairs_agreement_reaches_the_loss(tiny_model_dir, tmp_path):
    rows = []
    for i in range(8):
        rows.append(
            {
                "prompt": f"Review film {i}.",
                "completion": f"Great {i}.",
                "rating": 2.5,
                "ratings": [3, 3, 2, 2],
            }
        )
        rows.append(
            {
                "prompt": f"Review film {i}.",
                "completion": f"Awful {i}.",
                "rating": -1.0,
                "ratings": [-2, -2, 3, -3],
            }
        )
    data = write_jsonl(tmp_path / "rated.jsonl", rows)
    options = {
        "loss.name": "cdpo",
        "loss.epsilon_from_raters": True,
        "train.max_steps": 1,
        "data.pair_min_gap": 1.0,
    }
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, data, tmp_path / "run", **options)))
    seen = []
    compute = trainer.spec.compute
    trainer.spec = dataclasses.replace(
        trainer.spec, compute=lambda x, p: seen.append(x.agreement) or compute(x, p)
    )
    trainer.train()
    expected = (
        sum(1.0 if c > r else 0.5 if c == r else 0.0 for c in [3, 3, 2, 2] for r in [-2, -2, 3, -3]) / 16
    )
    assert seen and all(torch.allclose(a, torch.full_like(a, expected)) for a in seen)


def rater_rows(tmp_path, rows: list[dict]):
    return write_jsonl(tmp_path / "raters.jsonl", rows)


def test_max_per_rater_caps_each_raters_rows_by_content_hash(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0, "rater": "ann"} for i in range(6)]
    rows += [{"prompt": f"r{i}", "completion": f"b{i}", "label": True, "rater": 7} for i in range(2)]
    rows += [{"prompt": "s", "completion": "c", "label": False}]  # names no rater: always kept
    cap = 3
    # Independently: ann's three rows whose JSON hashes lowest.
    ann = sorted(rows[:6], key=lambda r: zlib.crc32(json.dumps(r, sort_keys=True).encode()))[:cap]
    expected = {r["prompt"] for r in ann} | {"r0", "r1", "s"}
    for order in (rows, rows[::-1]):
        [(kind, parsed)] = training_data(
            DataConfig(train=str(rater_rows(tmp_path, order)), max_per_rater=cap), False
        )
        assert kind == "unpaired" and {e.prompt for e in parsed} == expected
    [(_, everything)] = training_data(DataConfig(train=str(rater_rows(tmp_path, rows))), False)
    assert len(everything) == 9  # off by default


def test_max_per_rater_without_rater_ids_or_with_a_bad_one_is_a_clear_error(tmp_path):
    plain = rater_rows(tmp_path, [{"prompt": "q", "completion": "a", "label": True}])
    with pytest.raises(UserError, match="'rater' field; none do"):
        training_data(DataConfig(train=str(plain), max_per_rater=2), False)
    bad = rater_rows(tmp_path, [{"prompt": "q", "completion": "a", "label": True, "rater": ["x"]}])
    with pytest.raises(UserError, match=r"raters.jsonl:1: field 'rater': expected the rater's id"):
        training_data(DataConfig(train=str(bad), max_per_rater=2), False)
