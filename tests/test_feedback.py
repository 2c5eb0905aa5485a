"""`prospect feedback`: agreement and consensus against values computed by hand (Krippendorff's alpha from its
formula, here, independent of the library), a planted biased rater and a planted random rater flagged, the bias
checks flagging a planted length gap and a train/test duplicate and nothing in a clean table, one-line errors
for bad rows, and the command end to end (JSON, printed table, HTML page with the JSON's numbers)."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from types import SimpleNamespace

import pytest

from prospect.data.splits import held_out
from prospect.evaluation import feedback_checks as checks
from prospect.evaluation.feedback import FeedbackRequest, read_feedback, run_feedback
from tests.helpers import write_jsonl
from tests.test_cli import run_cli

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers, 12 units, with
# missing values (None). Published: nominal 0.743, ordinal 0.815, interval 0.849.
KRIPPENDORFF_2011 = {
    "A": [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
    "B": [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
    "C": [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
    "D": [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
}
PUBLISHED = {"nominal": 0.743, "ordinal": 0.815, "interval": 0.849}


def alpha_by_hand(units: Sequence[Sequence[float]], delta: Callable[[float, float], float]) -> float:
    """1 - D_o / D_e over the pairable values (units with two or more): D_o averages the distance of each
    ordered pair of values within a unit, weighted 1 / (m_u - 1); D_e of each ordered pair of all values."""
    pairable = [u for u in units if len(u) > 1]
    values = [v for u in pairable for v in u]
    n = len(values)
    observed = sum(sum(delta(a, b) for a, b in itertools.permutations(u, 2)) / (len(u) - 1) for u in pairable)
    expected = sum(delta(a, b) for a, b in itertools.permutations(values, 2)) / (n - 1)
    return 1 - observed / expected


def ordinal_delta(units: Sequence[Sequence[float]]) -> Callable[[float, float], float]:
    """Krippendorff's ordinal distance: (sum of the marginals from c to k - (n_c + n_k) / 2) squared."""
    counts = Counter(v for u in units if len(u) > 1 for v in u)

    def delta(a: float, b: float) -> float:
        low, high = sorted((a, b))
        between = sum(n for value, n in counts.items() if low <= value <= high)
        return (between - (counts[a] + counts[b]) / 2) ** 2

    return delta


def units_of(table: dict[str, list]) -> list[list[float]]:
    return [
        [row[u] for row in table.values() if row[u] is not None]
        for u in range(len(next(iter(table.values()))))
    ]


def rater_rows(table: dict[str, list]) -> list[dict]:
    return [
        {"id": f"unit-{u}", "completion": f"unit {u}", "rater": rater, "rating": value}
        for rater, row in table.items()
        for u, value in enumerate(row)
        if value is not None
    ]


# ----- agreement and consensus by hand ----------------------------------------------------------------------


def test_alpha_with_missing_ratings_matches_the_formula_and_the_published_values(tmp_path):
    path = write_jsonl(tmp_path / "raters.jsonl", rater_rows(KRIPPENDORFF_2011))
    feedback = read_feedback(str(path))
    units = [item.values for item in sorted(feedback.items, key=lambda i: int(i.id.split("-")[1]))]
    assert units == units_of(KRIPPENDORFF_2011)  # missing cells are simply absent
    by_hand = {
        "nominal": alpha_by_hand(units, lambda a, b: float(a != b)),
        "ordinal": alpha_by_hand(units, ordinal_delta(units)),
        "interval": alpha_by_hand(units, lambda a, b: (a - b) ** 2),
    }
    for level, published in PUBLISHED.items():
        result = checks.agreement(
            units if level != "nominal" else [[str(v) for v in u] for u in units], level, 200, 0
        )  # type: ignore[arg-type]
        assert result["alpha"] == pytest.approx(by_hand[level], abs=1e-9)
        assert round(result["alpha"], 3) == published
        assert result["low"] < result["alpha"] < result["high"]
        assert result["items"] == 11  # unit 12 has one value: not pairable


def test_nominal_alpha_on_a_three_item_table():
    # Units [a, a], [b, b], [a, b]: D_o = (0 + 0 + 2 / 1) / 6 = 1/3; the 6 values hold three a and three b, so
    # 18 of the 30 ordered pairs differ: D_e = 0.6; alpha = 1 - (1/3) / 0.6 = 4/9.
    result = checks.agreement([["a", "a"], ["b", "b"], ["a", "b"]], "nominal", 50, 0)
    assert result["alpha"] == pytest.approx(4 / 9)


def test_alpha_is_none_when_the_raters_cannot_disagree():
    assert checks.agreement([[1.0, 1.0], [1.0, 1.0, 1.0]], "interval", 10, 0)["alpha"] is None


def test_consensus_by_hand():
    c = checks.rating_consensus([1, 2, 4])
    assert (c.n, c.label, c.share, c.median) == (3, "positive", 1.0, 2)
    assert c.mean == pytest.approx(7 / 3)
    assert c.stderr == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))  # sample variance 7/3
    assert c.std == pytest.approx(math.sqrt(14 / 9))  # population variance (16 + 1 + 25) / 9 / 3
    c = checks.rating_consensus([-1, 0, 2, -3])
    assert (c.label, c.median, c.mean) == ("negative", -0.5, -0.5)
    assert c.share == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # a 0 counts half, as data.min_agreement reads it
    c = checks.label_consensus(["good", "bad", "good"])
    assert (c.label, c.share, c.mean) == ("good", pytest.approx(2 / 3), None)


def test_null_ratings_are_missing(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"completion": "a", "ratings": [1, None, 3]}])
    assert read_feedback(str(path)).items[0].values == [1.0, 3.0]


def test_votes_become_ratings_and_labels_agree_nominally(tmp_path):
    votes = write_jsonl(
        tmp_path / "votes.jsonl",
        [
            {
                "prompt": "p",
                "chosen": "a good answer",
                "rejected": "no",
                "votes_chosen": 3,
                "votes_rejected": 1,
            }
        ],
    )
    (item,) = read_feedback(str(votes)).items
    assert sorted(item.values) == [-1.0, 1.0, 1.0, 1.0]
    c = checks.rating_consensus(item.values)
    assert (c.mean, c.share, c.label) == (0.5, 0.75, "positive")
    rows = [
        {"completion": f"text {i}", "labels": {"j1": a, "j2": b}}
        for i, (a, b) in enumerate(["aa", "bb", "ab"])
    ]
    labels = read_feedback(str(write_jsonl(tmp_path / "labels.jsonl", rows)))
    assert [i.raters for i in labels.items] == [["j1", "j2"]] * 3
    result = checks.agreement([i.values for i in labels.items], "nominal", 20, 0)
    assert result["alpha"] == pytest.approx(4 / 9)


# ----- named raters --------------------------------------------------------------------------------------------


def planted_raters(seed: int = 0) -> list[dict]:
    """Six careful raters (truth + noise), one who adds 2.5 to everything, one who rates at random."""
    rng = random.Random(seed)
    rows = []
    for i in range(40):
        truth = rng.uniform(-3, 3)
        marks = {f"careful-{r}": round(truth + rng.gauss(0, 0.5)) for r in range(6)}
        marks |= {"biased": round(truth + 2.5), "random": rng.randint(-4, 4)}
        rows += [
            {"prompt": f"p{i}", "completion": f"text {i}", "rater": r, "rating": v} for r, v in marks.items()
        ]
    return rows


def test_planted_biased_and_random_raters_are_flagged(tmp_path):
    path = write_jsonl(tmp_path / "raters.jsonl", planted_raters())
    report = run_feedback(FeedbackRequest(str(path), judges="none", resamples=20))
    raters = {r["rater"]: r for r in report["raters"]["raters"]}
    assert report["raters"]["flagged"] == ["biased", "random"]
    assert raters["biased"]["bias"] == pytest.approx(2.5, abs=0.4)
    assert any("biased" in f for f in raters["biased"]["flags"])
    assert raters["biased"]["correlation"] > 0.9  # an offset alone keeps the order
    assert any("low correlation" in f for f in raters["random"]["flags"])
    assert report["raters"]["raters"][0]["rater"] == "random"  # lowest correlation first
    accuracy = {name: r["dawid_skene_accuracy"] for name, r in raters.items()}
    assert min(accuracy, key=lambda name: accuracy[name]) in ("random", "biased")
    assert all(accuracy[f"careful-{r}"] > max(accuracy["random"], accuracy["biased"]) for r in range(6))
    assert report["raters"]["dawid_skene"]["agrees_with_consensus"] >= 0.8
    assert any(f.startswith("rater biased:") for f in report["flags"])


def test_no_rater_is_flagged_among_careful_ones(tmp_path):
    rows = [r for r in planted_raters(seed=1) if r["rater"].startswith("careful")]
    report = run_feedback(
        FeedbackRequest(str(write_jsonl(tmp_path / "r.jsonl", rows)), judges="none", resamples=5)
    )
    assert report["raters"]["flagged"] == []


# ----- bias checks -----------------------------------------------------------------------------------------------


def rated_rows(n: int = 40, praise: str = "") -> list[dict]:
    """Half desirable (+2), half undesirable (-2) items, every text the same length; `praise` lengthens the
    desirable ones."""
    return [
        {"prompt": f"prompt {i:03d}", "completion": f"review {i:03d} of the film" + (praise if i % 2 else ""),
         "ratings": [2, 3, 1] if i % 2 else [-2, -3, -1]}
        for i in range(n)
    ]  # fmt: skip


def split_of(prompt: str) -> bool:
    """Whether training holds out a row with this prompt (10% of prompts, by hash)."""
    return held_out(SimpleNamespace(prompt=prompt, completion=""), 10)


def test_a_clean_table_is_not_flagged(tmp_path):
    report = run_feedback(
        FeedbackRequest(str(write_jsonl(tmp_path / "clean.jsonl", rated_rows())), judges="none", resamples=20)
    )
    assert report["flags"] == []
    assert report["checks"]["length"]["all"]["chars"]["gap"] == 0
    assert report["checks"]["balance"]["all"]["desirable_share"] == 0.5


def test_a_planted_length_gap_is_flagged(tmp_path):
    rows = rated_rows(praise=" and truly wonderful in every single way")
    report = run_feedback(
        FeedbackRequest(str(write_jsonl(tmp_path / "long.jsonl", rows)), judges="none", resamples=20)
    )
    length = report["checks"]["length"]["all"]
    assert length["flagged"] and length["chars"]["gap"] == len(" and truly wonderful in every single way")
    assert length["words"]["gap"] == 7
    assert [
        f
        for f in report["flags"]
        if f.startswith("length (all): desirable texts are 40.0 characters (7.0 words) longer")
    ]


def test_a_length_gap_of_pooled_groups_alone_is_told_apart(tmp_path):
    # Short texts mostly desirable, long ones mostly undesirable: within each group no gap, pooled a gap of
    # 15 - 25 = -10 characters (z about -3.6).
    rows = [
        {
            "completion": f"{group[0]}{i:02d}".ljust(size, "."),
            "ratings": [2, 2] if good else [-2, -2],
            "source": group,
        }
        for group, size, desirable in (("short", 10, 15), ("long", 30, 5))
        for i in range(20)
        for good in [i < desirable]
    ]
    report = run_feedback(
        FeedbackRequest(str(write_jsonl(tmp_path / "mix.jsonl", rows)), judges="none", resamples=5)
    )
    length = report["checks"]["length"]
    assert length["all"]["chars"]["gap"] == -10 and length["all"]["flagged"]
    assert length["short"]["chars"]["gap"] == length["long"]["chars"]["gap"] == 0
    assert not length["short"]["flagged"] and not length["long"]["flagged"]


def test_a_planted_duplicate_across_splits_is_flagged(tmp_path):
    rows = rated_rows()
    test_prompt = next(p for p in (f"held out? {i}" for i in range(1000)) if split_of(p))
    train_prompt = next(p for p in (f"trained? {i}" for i in range(1000)) if not split_of(p))
    rows += [{"prompt": test_prompt, "completion": "The same review.", "ratings": [1, 1]},
             {"prompt": train_prompt, "completion": "the SAME review", "ratings": [1, 2]}]  # fmt: skip
    report = run_feedback(
        FeedbackRequest(str(write_jsonl(tmp_path / "dup.jsonl", rows)), judges="none", resamples=20)
    )
    copies = report["checks"]["duplicates"]
    assert (copies["exact"]["across_splits"], copies["near"]["across_splits"], copies["flagged"]) == (
        0,
        1,
        True,
    )
    assert any(f.startswith("duplicates across train and test: 0 exact, 1 near") for f in report["flags"])


def test_duplicates_length_and_concentration_by_hand():
    found = checks.duplicates(
        ["A film.", "a  FILM!", "x", "x"], ["train", "test", "train", "test"], list("abcd")
    )
    assert found["exact"]["across_splits"] == 1 and found["exact"]["examples"] == [["c", "d"]]
    assert found["near"]["across_splits"] == 2 and found["flagged"]
    assert not checks.duplicates(["a", "b"], ["train", "test"], ["1", "2"])["flagged"]
    gap = checks.length_gap(["aaaa", "aaaaaa"], ["aa", "aa"])  # means 5 and 2; Welch s.e. sqrt(2/2 + 0/2) = 1
    assert (gap["chars"]["gap"], gap["chars"]["stderr"], gap["chars"]["z"]) == (3, 1, 3) and not gap[
        "flagged"
    ]
    shares = checks.concentration([50, 30] + [1] * 20)  # 100 in all; the top 1% is one of 22
    assert (shares["top_1_percent"], shares["top_10"]) == (0.5, 0.88)
    balance = checks.label_balance([True, True, True, False, None], ["a", "a", "b", "b", "b"])
    assert balance["all"]["desirable_share"] == 0.75 and balance["all"]["flagged"]
    assert balance["groups"]["b"] == {
        "desirable": 1,
        "undesirable": 1,
        "neither": 1,
        "desirable_share": 0.5,
        "flagged": False,
    }


def test_judge_agreement_and_calibration_by_hand():
    result = checks.judge_agreement([1, 2, 3, 4], [2, 4, 6, 9])
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-3.25, -1.25, 0.75, 3.75): r = 11.5 / sqrt(5 * 26.75)
    assert result["pearson"] == pytest.approx(11.5 / math.sqrt(5 * 26.75)) and result["spearman"] == 1.0
    assert checks.judge_agreement([1, 1, 2], [0, 1, 2])["spearman"] == pytest.approx(
        0.8660254
    )  # tied ranks 1.5
    assert checks.judge_agreement([-1, 0.5, 0], [-2, -1, 3])["sign_agreement"] == 0.5  # the 0 is left out
    curve = checks.calibration_curve([1, 2, 3, 4], [2, 4, 6, 8], bins=2)  # bins [1, 2.5) and [2.5, 4]
    assert [(b["judge_mean"], b["human_mean"], b["items"]) for b in curve] == [(1.5, 3, 2), (3.5, 7, 2)]


# ----- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("second", "expected"),
    [
        ({"completion": "b", "ratings": [1, "x"]}, "field 'ratings[1]': expected a finite number, got \"x\""),
        ({"completion": "b", "ratings": []}, "field 'ratings': expected a non-empty list of numbers"),
        ({"completion": "b", "rating": 1}, "field 'ratings': expected a row like the first one"),
        ({"completion": "", "ratings": [1]}, "field 'completion': expected non-empty text"),
    ],
)
def test_bad_rows_end_in_one_line_naming_file_line_and_field(second, expected, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"completion": "a", "ratings": [1, 2]}, second])
    code, _, err = run_cli(["feedback", str(path), "--judges", "none", "--bootstrap", "5"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {path}:2: {expected}")


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([{"completion": "a", "score": 1}], ":1: field 'ratings': expected a list of ratings, or feedback in one"),
        ([{"completion": "a", "rater": "x", "rating": 1}, {"completion": "a", "rater": "x", "rating": 2}],
         ":2: field 'rater': expected one mark per rater and item (x marked it at"),
        ([{"completion": "a", "labels": {"j": [1]}}], ":1: field 'labels.j': expected a label"),
        ([{"prompt": "p", "chosen": "a", "rejected": "b", "votes_chosen": 1.5, "votes_rejected": 0}],
         ":1: field 'votes_chosen': expected a whole number of votes, got 1.5"),
    ],
)  # fmt: skip
def test_bad_feedback_shapes(rows, expected, tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, _, err = run_cli(["feedback", str(path), "--judges", "none", "--bootstrap", "5"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {path}{expected}")


def test_bad_options(tmp_path, capsys):
    path = write_jsonl(tmp_path / "ok.jsonl", rated_rows(4))
    for argv, expected in (
        (["--judges", "llm:owner/model"], "--judges llm:owner/model: compares two completions"),
        (["--corpora", "tweets"], "--corpora picks corpora of the VADER study"),
        (["--bootstrap", "0"], "--bootstrap 0: expected a number of resamples >= 1"),
        (["--html", str(tmp_path / "page.txt")], "the page is an HTML file"),
    ):
        code, _, err = run_cli(["feedback", str(path), *argv], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


# ----- the command end to end ---------------------------------------------------------------------------------


def test_command_writes_json_table_and_page(tmp_path, capsys):
    rows = [
        dict(r, source="films" if i < 20 else "books", id=f"item-{i}") for i, r in enumerate(rated_rows())
    ]
    rows[0]["completion"], rows[1]["completion"] = "a wonderful, moving film", "a dull and awful mess"
    data, out, page = (
        write_jsonl(tmp_path / "f.jsonl", rows),
        tmp_path / "out" / "f.json",
        tmp_path / "f.html",
    )
    argv = ["feedback", str(data), "--bootstrap", "50", "--seed", "3", "-o", str(out), "--html", str(page)]
    code, printed, err = run_cli(argv, capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    assert report["kind"] == "feedback" and list(report["agreement"]) == ["films", "books", "all"]
    assert report["data"]["items"] == 40 and report["settings"] == {
        **report["settings"],
        "resamples": 50,
        "seed": 3,
    }
    assert [i["id"] for i in report["items"][:2]] == ["item-0", "item-1"]
    assert report["items"][1]["mean"] == 2 and report["items"][1]["label"] == "positive"
    assert report["judges"]["vader"]["items"] == 40
    alpha = report["agreement"]["all"]["interval"]
    assert f"{alpha['alpha']:.3f} [{alpha['low']:.3f}, {alpha['high']:.3f}]" in printed
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("data:image/png;base64,") == 3
    shown = dict(re.findall(r'data-key="([^"]+)">([^<]+)<', html))
    assert shown["alpha/all/interval/alpha"] == f"{alpha['alpha']:.3f}"
    assert shown["alpha/films/ordinal/high"] == f"{report['agreement']['films']['ordinal']['high']:.3f}"
    assert shown["judge/vader/all/pearson"] == f"{report['judges']['vader']['pearson']:.3f}"
    assert shown["length/books/chars/gap"] == f"{report['checks']['length']['books']['chars']['gap']:.3f}"
    code, _, err = run_cli(argv, capsys)  # never overwritten silently
    assert code == 2 and "exists; pass --overwrite" in err
    assert run_cli([*argv, "--overwrite"], capsys)[0] == 0
    assert json.loads(out.read_text())["agreement"] == report["agreement"]  # seeded: the same intervals


@pytest.mark.slow
def test_real_vader_movie_ratings():
    from prospect.data import vader

    report = run_feedback(FeedbackRequest(corpora=["movieReviewSnippets"], resamples=50))
    truth = {f"movies-{t.id}": t for t in vader.load_ratings("movieReviewSnippets")}
    assert report["data"]["items"] == len(truth) == 10605
    for record in report["items"][:500]:  # our spread is the corpus's own std column
        assert record["std"] == pytest.approx(truth[record["id"]].std, abs=1e-4)
        assert record["mean"] == pytest.approx(truth[record["id"]].mean, abs=1e-6)
    alpha = report["agreement"]["all"]["interval"]
    assert 0.7 < alpha["low"] < alpha["alpha"] < alpha["high"] < 0.9
    assert 0.35 < report["judges"]["vader"]["pearson"] < 0.55  # Hutto & Gilbert report r = 0.451 on movies


def test_judge_table_keeps_long_judge_names_whole_and_aligned():
    from prospect.report.feedback import judge_lines

    name = "reward:runs/reward-bt-smollm2-vader/final"
    row = {"items": 3, "pearson": 0.5, "spearman": 0.25, "sign_agreement": 0.75}
    header, group_line, total = judge_lines({name: {**row, "groups": {"tweets": row}}})
    assert group_line.startswith(name) and total.startswith(name)
    assert header.index("group") == group_line.index("tweets") == total.index("all")
