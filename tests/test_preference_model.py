"""The pairwise preference model P(y > y' | x) of Nash learning from human feedback: the duel data, the loss
against hand-computed values, calibration measures by hand, training that learns held-out preferences, and
every judge read as a preference through one interface."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prospect.cli import main
from prospect.config import DataConfig
from prospect.data.convert import duel_text, to_duels
from prospect.data.formats import Pair
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.evaluation.judges import AIJudgeOptions, NamedJudge, check_judges, load_judge
from prospect.evaluation.preferences import quality, shown_in_random_order
from prospect.losses import get_loss
from prospect.losses.base import LossInputs
from prospect.recipe import load_config
from tests.helpers import paired_rows, tiny_overrides, write_jsonl


def test_each_pair_is_two_duels_one_per_order():
    pairs = [
        Pair("Review it.", "Good.", "Bad.", "f:1"),
        Pair(
            [{"role": "user", "content": "Q?"}],
            [{"role": "assistant", "content": "Yes."}],
            [{"role": "assistant", "content": "No."}],
            "f:2",
        ),
    ]
    duels = to_duels("paired", pairs, DataConfig(), 0)
    by_location = {(d.location, d.label): d for d in duels}
    assert len(duels) == 4
    assert (
        by_location[("f:1", True)].completion
        == duel_text("Good.", "Bad.")
        == "Response A:\nGood.\n\nResponse B:\nBad."
    )
    assert by_location[("f:1", False)].completion == duel_text("Bad.", "Good.")
    assert by_location[("f:2", True)].completion == [
        {"role": "assistant", "content": duel_text("Yes.", "No.")}
    ]


def test_preference_loss_by_hand():
    spec = get_loss("preference")
    assert (spec.data, spec.model, spec.needs_reference) == ("duels", "reward", False)
    scores, labels = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64), torch.tensor([True, False, False])
    out = spec.compute(LossInputs(scores=scores, labels=labels), spec.make_params({}, "test"))
    expected = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))]
    torch.testing.assert_close(out.losses, torch.tensor(expected, dtype=torch.float64))
    value, count = out.means["accuracy"]
    assert float(value) / float(count) == pytest.approx(2 / 3)


def test_accuracy_and_calibration_by_hand():
    q = quality([0.9, 0.2, 0.5, 0.7, None], [True, False, True, False, True])
    assert (q.comparisons, q.unjudged) == (4, 1)
    assert q.accuracy == pytest.approx((1 + 1 + 0.5 + 0) / 4)  # a tie counts half
    assert q.brier == pytest.approx((0.1**2 + 0.2**2 + 0.5**2 + 0.7**2) / 4)
    assert q.ece == pytest.approx((0.1 + 0.2 + 0.5 + 0.7) / 4)  # one prediction a bin here
    assert [(b.low, b.count) for b in q.bins] == [(0.2, 1), (0.5, 1), (0.7, 1), (0.9, 1)]
    constant = quality([0.5] * 4, [True, False, True, False])
    assert constant.accuracy == 0.5 and constant.ece == 0.0  # always 0.5 is calibrated, and useless


def test_pairs_are_shown_in_a_random_order_fixed_by_the_seed():
    pairs = [Pair("p", f"good {i}", f"bad {i}", "x") for i in range(200)]
    _, shown, first_wins = shown_in_random_order(pairs, seed=3)
    assert 70 < sum(first_wins) < 130
    assert all((a.startswith("good")) == wins for (a, _), wins in zip(shown, first_wins))
    assert shown_in_random_order(pairs, seed=3)[1] == shown


def test_scores_read_as_preferences():
    lexicon = NamedJudge("count", score=lambda texts, items: [float(t.count("good")) for t in texts])
    assert lexicon.prefer(["p"] * 3, [("good good", "good"), ("x", "x"), ("", "good")]) == [1.0, 0.5, 0.0]
    reward = NamedJudge("rm", score=lambda texts, items: [float(len(t)) for t in texts], bradley_terry=True)
    (p,) = reward.prefer(["p"], [("abc", "a")])
    assert p == pytest.approx(1 / (1 + math.exp(-2)))


def test_a_tiny_preference_model_learns_which_of_two_is_preferred(tiny_model_dir, tmp_path, capsys):
    """Trained on duels, it orders held-out pairs of unseen prompts as people did, and reads them the same in
    either order (P(a > b) = 1 - P(b > a) exactly: the two readings are averaged)."""
    train = write_jsonl(tmp_path / "pairs.jsonl", paired_rows(48))
    held = write_jsonl(
        tmp_path / "held.jsonl",
        [dict(r, prompt=r["prompt"].replace("Review", "Rate")) for r in paired_rows(16)],
    )
    options = {
        "loss.name": "preference",
        "train.max_steps": 60,
        "train.learning_rate": 1e-3,
        "data.eval": str(held),
        "data.eval_split": "train",
        "data.max_length": 64,
        "eval.num_prompts": 16,
    }
    run = tmp_path / "pm"
    trainer = Trainer(load_config(None, tiny_overrides(tiny_model_dir, train, run, **options)))
    trainer.train()
    before = json.loads((run / "eval_before.json").read_text())
    after = json.loads((run / "eval_after.json").read_text())
    assert after["comparisons"] == 16 and after["pair_accuracy"] >= 0.9 > before["pair_accuracy"]
    assert after["brier"] < before["brier"]
    judge = load_judge(f"pairwise:{run}", AIJudgeOptions(), torch.device("cpu"), False)
    pairs = [
        ("It was a wonderful film.", "It was a dull mess."),
        ("It was tedious and cold.", "It was great acting and a moving story."),
    ]
    forward = judge.prefer(["Rate the space movie."] * 2, pairs)
    backward = judge.prefer(["Rate the space movie."] * 2, [(b, a) for a, b in pairs])
    assert forward[0] > 0.5 > forward[1]
    for f, b in zip(forward, backward):
        assert f + b == pytest.approx(1.0, abs=1e-6)

    # `prospect preferences`: the model and the lexicon on the same held-out pairs; the report draws them.
    prefs, page = tmp_path / "prefs.json", tmp_path / "prefs.html"
    argv = ["preferences", "--judges", f"pairwise:{run},vader", "--data", str(held), "--split", "train"]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "-o", str(prefs)])
    assert exit_info.value.code == 0
    report = json.loads(prefs.read_text())
    model, lexicon = report["sources"][f"pairwise:{run}"], report["sources"]["vader"]
    assert report["pairs"] == 16 and model["comparisons"] == lexicon["comparisons"] == 16
    assert model["accuracy"] == pytest.approx(after["pair_accuracy"])  # the trainer's own measurement
    assert lexicon["accuracy"] == 1.0 and lexicon["ece"] == 0.0  # hard and always right on these phrases
    assert sum(b["count"] for b in model["bins"]) == 16
    with pytest.raises(SystemExit) as exit_info:
        main(["report", "--preferences", str(prefs), "-o", str(page)])
    assert exit_info.value.code == 0
    html = page.read_text()
    assert f'data-key="prefs.json:pairwise:{run}:ece">{model["ece"]:.3f}<' in html
    assert html.count("<img") == 1


def test_a_missing_pairwise_model_is_named():
    with pytest.raises(
        UserError, match=r"online.preference pairwise:/no/such: no such directory \(expected a pairwise"
    ):
        check_judges("pairwise:/no/such", AIJudgeOptions(), option="online.preference")
