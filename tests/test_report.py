"""`prospect report`: what it reads from runs and `prospect eval` files, its errors, and the page itself in a
real headless Chromium (every image loads; the numbers shown are those in the JSON; text is escaped)."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pytest
import yaml

from prospect.errors import UserError
from prospect.report.eval_file import load_eval
from prospect.report.markup import fmt, framing
from prospect.report.page import method_labels, write_report
from prospect.report.plots import moving_average
from prospect.report.runs import (
    Point,
    common_kl_levels,
    curves,
    frontier_points,
    load_run,
    pair_samples,
    read_log,
    score_at_kl,
)
from tests.browser import Browser, install_chromium
from tests.helpers import tiny_overrides
from tests.test_cli import run_cli

HOSTILE = '<script>alert("x")</script> & <b>bold</b> </td></tr>'
PAGE_FACTS = """JSON.stringify({
  images: Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  keys: Object.fromEntries(Array.from(document.querySelectorAll('[data-key]')).map(e => [e.dataset.key, e.textContent])),
  samples: Array.from(document.querySelectorAll('table.samples')).map(t =>
    Array.from(t.tBodies[0].rows).map(r => Array.from(r.cells).map(c => c.textContent))),
  scripts: document.scripts.length,
  bold: document.querySelectorAll('td b').length,
})"""


def write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=1))


def held_out(mean: float, kl: float, answers: list[str]) -> dict:
    return {
        "judge_mean": mean,
        "judge_stderr": 0.031,
        "positive_fraction": 0.5 + mean / 2,
        "kl_mean": kl,
        "kl_stderr": 0.012,
        "length_mean": 12.25,
        "samples": [
            {
                "prompt": f"<|im_start|>user\nReview film {i}.<|im_end|>\n<|im_start|>assistant\n",
                "completion": a,
                "score": 0.1 * i,
            }
            for i, a in enumerate(answers)
        ],
    }


def fake_run(path: Path, method: str = "kto", seed: int = 1, gain: float = 0.2, **config: object) -> Path:
    """A run directory as prospect writes it: 20 steps, evaluations at steps 10 and 20 (the last)."""
    path.mkdir(parents=True)
    (path / "prospect-run.json").write_text('{"prospect": "0.1.0"}')
    recipe = {
        "model": {"name": "tiny"},
        "data": {"train": "d.jsonl", "unpaired_from_pairs": "both"},
        "train": {"seed": seed},
        "eval": {"judge": "vader"},
    }
    recipe["loss"] = {"name": method, "beta": 0.1}
    for key, value in config.items():
        section, option = key.split("__")
        recipe.setdefault(section, {})[option] = value
    (path / "config.yaml").write_text(yaml.safe_dump(recipe))
    lines = [
        {
            "step": s,
            "loss": 0.5 - s / 100,
            "rewards/desirable": s / 50,
            "rewards/undesirable": -s / 50,
            "kl_estimate_raw": s / 200,
            "reference_point": s / 200,
            "grad_norm": 2.0,
            "lr": 1e-5,
            "tokens_per_s": 100.0 + s,
        }
        for s in range(1, 21)
    ]
    lines[4]["rewards/undesirable"] = math.nan  # a step with no undesirable example
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    before, after = held_out(0.1, 0.0, ["dull", "fine"]), held_out(0.1 + gain, 0.4, ["great", HOSTILE])
    evals = [
        {
            "step": 10,
            "eval_loss": 0.45,
            **{k: v for k, v in held_out(0.2, 0.25, []).items() if k != "samples"},
            "best": False,
        }
    ]
    evals.append(
        {"step": 20, "eval_loss": 0.4, **{k: v for k, v in after.items() if k != "samples"}, "best": False}
    )
    (path / "evals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    write_json(path / "eval_before.json", before)
    write_json(path / "eval_after.json", after)
    summary = {
        w: {k: v for k, v in r.items() if k != "samples"} for w, r in (("before", before), ("after", after))
    }
    write_json(path / "report.json", summary)
    return path


def fake_eval(path: Path, checkpoints: list[tuple[str, str]]) -> Path:
    """A `prospect eval` file judging (name, path) checkpoints with two judges."""

    def checkpoint(i: int, name: str, where: str) -> dict:
        return {
            "name": name,
            "path": where,
            "judge": {
                "vader": {"mean": 0.3 + i / 10, "stderr": 0.02},
                "rm": {"mean": 1.5 + i, "stderr": 0.2},
            },
            "baseline_judge": {"vader": {"mean": 0.2, "stderr": 0.02}, "rm": {"mean": 1.0, "stderr": 0.2}},
            "win_rate": {
                "vader": {
                    "rate": 0.6 + i / 20,
                    "low": 0.52,
                    "high": 0.7,
                    "wins": 30,
                    "ties": 4,
                    "losses": 16,
                },
                "rm": {"rate": 0.55, "low": 0.45, "high": 0.65, "wins": 27, "ties": 1, "losses": 22},
            },
            "lc_win_rate": {"vader": {"rate": 0.58, "low": 0.5, "high": 0.66}},
            "kl": {"mean": 0.2 * (i + 1), "stderr": 0.01},
            "length": {"mean": 20.5, "baseline_mean": 18.0},
            "accuracy": None,
            "samples": [
                {
                    "prompt": "p <1>",
                    "completion": HOSTILE,
                    "baseline": "b",
                    "scores": {"vader": 0.5},
                    "baseline_scores": {"vader": 0.1},
                }
            ],
        }

    write_json(
        path,
        {
            "prompts": {"source": "vader-movies", "count": 50},
            "baseline": {"name": "reference", "path": "smollm2"},
            "judges": ["vader", "rm"],
            "checkpoints": [checkpoint(i, n, w) for i, (n, w) in enumerate(checkpoints)],
            "agreement": {"vader~rm": {"verdict_agreement": 0.81, "spearman": 0.66}},
        },
    )
    return path


def test_curves_come_from_the_metrics_log_and_a_line_being_written_is_left_out(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(
        '{"step": 1, "loss": 0.5, "r": NaN, "skipped": 1.0}\n{"step": 2, "loss": 0.25, "r": 1}\n{"step": 3, "lo'
    )
    found = curves(read_log(log))
    assert list(found) == ["loss", "r"]
    assert (found["loss"].steps, found["loss"].values) == ([1, 2], [0.5, 0.25])
    assert (found["r"].steps, found["r"].values) == ([2], [1.0])
    log.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n{"step": 3, "loss": 0.1}\n')
    with pytest.raises(UserError, match=rf"^{re.escape(str(log))}:2: not a JSON line$"):
        read_log(log)
    log.write_text('{"loss": 0.5}\n{"step": 2}\n')
    with pytest.raises(UserError, match=r':1: expected an object with an integer "step"'):
        read_log(log)


def test_frontier_points_are_before_each_evaluation_and_after(tmp_path):
    run = load_run(fake_run(tmp_path / "a"))
    points = frontier_points(run)
    assert [(p.label, p.step) for p in points] == [
        ("before", 0),
        ("step 10", 10),
        ("after", 20),
    ]  # 20: same as after
    after = json.loads((tmp_path / "a" / "report.json").read_text())["after"]
    assert (points[-1].score, points[-1].score_se, points[-1].kl, points[-1].kl_se) == (
        after["judge_mean"],
        after["judge_stderr"],
        after["kl_mean"],
        after["kl_stderr"],
    )
    assert (points[1].score, points[1].kl) == (0.2, 0.25)
    (tmp_path / "a" / "eval_after.json").unlink()
    (tmp_path / "a" / "report.json").unlink()  # still training: the evaluation at its last step is a point
    assert [p.label for p in frontier_points(load_run(tmp_path / "a"))] == ["before", "step 10", "step 20"]


def test_samples_pair_by_prompt_in_order():
    left = [
        {"prompt": "a", "completion": "1", "score": 0.1},
        {"prompt": "b", "completion": "2"},
        {"prompt": "a", "completion": "3"},
    ]
    right = [
        {"prompt": "a", "completion": "x", "score": 0.5},
        {"prompt": "c", "completion": "y"},
        {"prompt": "a", "completion": "z"},
    ]
    pairs = pair_samples(left, right)
    assert [(p.prompt, p.left, p.right, p.left_score, p.right_score) for p in pairs] == [
        ("a", "1", "x", 0.1, 0.5),
        ("a", "3", "z", None, None),
    ]


def test_helpers_average_frame_and_format():
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert framing(["<s>\nReview A.\n</s>", "<s>\nReview B, please.\n</s>"]) == ("<s>\n", "\n</s>")
    assert framing(['u\nbegin "A".<e>\na\n', 'u\nbegin "B".<e>\na\n']) == ("u\n", "<e>\na\n")
    assert framing(["Say A.", "Say B."]) == ("", "")
    assert (fmt(0.12345), fmt(-0.5, signed=True), fmt(3), fmt(None), fmt(math.nan)) == (
        "0.123",
        "-0.500",
        "3",
        "–",
        "–",
    )


def test_two_seeds_share_a_line_and_variants_do_not(tmp_path):
    runs = [
        load_run(fake_run(tmp_path / "s1", seed=1)),
        load_run(fake_run(tmp_path / "s2", seed=2)),
        load_run(fake_run(tmp_path / "one", seed=1, data__unpaired_from_pairs="one")),
        load_run(fake_run(tmp_path / "dpo", method="dpo")),
    ]
    labels = method_labels(runs)
    assert [labels[r.path] for r in runs] == [
        "kto (data.unpaired_from_pairs=both)",
        "kto (data.unpaired_from_pairs=both)",
        "kto (data.unpaired_from_pairs=one)",
        "dpo",
    ]


def test_two_runs_of_one_name_are_told_apart_by_their_paths(tmp_path):
    runs = [fake_run(tmp_path / "a" / "kto"), fake_run(tmp_path / "b" / "kto")]
    html = write_report(runs, [], tmp_path / "r.html").read_text()
    assert all(f'data-key="{run}/after/judge_mean"' in html for run in runs)
    assert 'data-key="kto/after/judge_mean"' not in html


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (
            lambda d: d.update(checkpoints=[]),
            "top level: field 'checkpoints': expected a non-empty list, got []",
        ),
        (
            lambda d: d["checkpoints"][0]["win_rate"]["vader"].pop("low"),
            "checkpoints[0].win_rate.vader: field 'low': expected a number or null",
        ),
        (
            lambda d: d["checkpoints"][0].update(kl=[1]),
            "checkpoints[0]: field 'kl': expected an object, got [1]",
        ),
        (lambda d: d.update(judges="vader"), "top level: field 'judges': expected a list of judge names"),
        (
            lambda d: d["checkpoints"][0]["kl"].update(mean="0.2"),
            "checkpoints[0].kl: field 'mean': expected a number or null, got \"0.2\"",
        ),
    ],
)
def test_a_bad_eval_file_is_one_line_naming_the_field(mangle, message, tmp_path):
    path = fake_eval(tmp_path / "eval.json", [("a", "x")])
    data = json.loads(path.read_text())
    mangle(data)
    write_json(path, data)
    with pytest.raises(UserError) as error:
        load_eval(path)
    assert str(error.value).startswith(f"{path}: {message}") and "\n" not in str(error.value)


def test_numbers_left_undefined_are_shown_as_missing(tmp_path):
    """`prospect eval` writes null (or NaN) for a number it cannot define: no bar, no point, a dash."""
    path = fake_eval(tmp_path / "eval.json", [("a", "x"), ("b", "y")])
    data = json.loads(path.read_text())
    data["checkpoints"][0]["win_rate"]["vader"].update(rate=None, low=None, high=None)
    data["checkpoints"][1]["judge"]["rm"]["stderr"] = None
    data["agreement"]["vader~rm"]["spearman"] = math.nan
    path.write_text(json.dumps(data))
    loaded = load_eval(path)
    assert loaded.checkpoints[0].win_rate["vader"] == {"wins": 30, "ties": 4, "losses": 16}
    assert loaded.agreement == {"vader~rm": {"verdict_agreement": 0.81}}
    html = write_report([], [path], tmp_path / "r.html").read_text()
    assert (
        'data-key="a/vader/win_rate/rate"' not in html and 'data-key="b/vader/win_rate/rate">0.650<' in html
    )
    assert (
        html.count("<img") == 1 + 2
    )  # vader's frontier (rm's has one point left: none) and both win-rate charts


def test_bad_input_is_one_line(tmp_path, capsys):
    good = fake_run(tmp_path / "good")
    unfinished = fake_run(tmp_path / "unfinished")
    for name in ("eval_after.json", "report.json"):
        (unfinished / name).unlink()
    (tmp_path / "broken.json").write_text("{")
    out = str(tmp_path / "r.html")
    for argv, expected in [
        ([str(tmp_path / "nope"), "-o", out], f"{tmp_path / 'nope'}: no such run directory"),
        ([str(tmp_path), "-o", out], f"{tmp_path}: not a prospect run directory (no prospect-run.json)"),
        (
            [str(good), str(unfinished), "-o", out],
            f"{unfinished}: no held-out evaluation after training (report.json)",
        ),
        ([str(good), "-o", str(tmp_path / "r.txt")], f"{tmp_path / 'r.txt'}: the report is an HTML file"),
        (["-o", out], "prospect report: give one or more run directories, --eval or --preferences files"),
        (["--eval", str(tmp_path / "broken.json"), "-o", out], f"{tmp_path / 'broken.json'}: not valid JSON"),
        (
            ["--eval", str(tmp_path / "missing.json"), "-o", out],
            f"{tmp_path / 'missing.json'}: no such eval file",
        ),
        (
            ["--preferences", str(good / "report.json"), "-o", out],
            f'{good / "report.json"}: not a `prospect preferences` file (expected "kind": "preferences")',
        ),
    ]:
        code, _, err = run_cli(["report", *argv], capsys)
        assert code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "r.html").exists()


@pytest.fixture(scope="module")
def browser():
    missing = install_chromium()
    if missing:
        pytest.skip(f"no headless browser for the report test: {missing}")
    opened = Browser()
    yield opened
    opened.close()


def expected_keys(name: str, run: Path) -> dict[str, str]:
    """The numbers the page must show for a run, from its JSON: before and after, and each evaluation."""
    shown = {}
    for when in ("before", "after"):
        result = json.loads((run / f"eval_{when}.json").read_text())
        shown.update(
            {f"{name}/{when}/{k}": fmt(v) for k, v in result.items() if k != "samples" and v is not None}
        )
    return shown


def test_a_tiny_run_writes_a_report_that_opens_in_a_browser(
    tiny_model_dir, kto_file, tmp_path, capsys, browser
):
    out = tmp_path / "run"
    options = {"eval.num_prompts": 3, "eval.max_new_tokens": 4, "eval.judge": "vader", "eval.every": 2}
    code, stdout, err = run_cli(["train", *tiny_overrides(tiny_model_dir, kto_file, out, **options)], capsys)
    assert code == 0, err
    assert stdout.splitlines()[-1].endswith(f"report: {out / 'report.json'} and {out / 'report.html'}")
    page = browser.open(out / "report.html", PAGE_FACTS)
    assert len(page["images"]) >= 6 and all(c and w > 0 and h > 0 for c, w, h in page["images"])
    expected = expected_keys("run", out)
    assert len(expected) == 12 and {k: page["keys"][k] for k in expected} == expected
    evals = [json.loads(line) for line in (out / "evals.jsonl").read_text().splitlines()]
    assert page["keys"]["run/step 2/kl_mean"] == fmt(evals[0]["kl_mean"])
    before = json.loads((out / "eval_before.json").read_text())["samples"]
    after = json.loads((out / "eval_after.json").read_text())["samples"]
    [rows] = page["samples"]
    assert [(r[2], r[3], r[4], r[5]) for r in rows] == [
        (b["completion"], fmt(b["score"]), a["completion"], fmt(a["score"])) for b, a in zip(before, after)
    ]
    # The check above fails for an image that does not decode.
    broken = tmp_path / "broken.html"
    broken.write_text((out / "report.html").read_text().replace("base64,iVBOR", "base64,AAAAA", 1))
    assert sum(w == 0 for _, w, _ in browser.open(broken, PAGE_FACTS)["images"]) == 1


def test_runs_and_eval_files_compared_in_a_browser(tmp_path, capsys, browser):
    runs = [
        fake_run(tmp_path / "kto-a", seed=1),
        fake_run(tmp_path / "kto-b", seed=2, gain=0.3),
        fake_run(tmp_path / "dpo", method="dpo"),
    ]
    evals = fake_eval(
        tmp_path / "eval.json", [("kto final", str(runs[0] / "final")), ("dpo <final>", str(runs[2]))]
    )
    out = tmp_path / "compare.html"
    code, stdout, err = run_cli(["report", *map(str, runs), "--eval", str(evals), "-o", str(out)], capsys)
    assert code == 0 and stdout == f"report: {out}\n", err
    page = browser.open(out, PAGE_FACTS)
    # Per run 6 curve panels and the before/after bars; the frontier of the runs, that of the eval file for
    # each judge, and its win rates for each judge.
    assert len(page["images"]) == 3 * 7 + 1 + 2 + 2 and all(c and w > 0 for c, w, _ in page["images"])
    expected = {k: v for r in runs for k, v in expected_keys(r.name, r).items()}
    data = json.loads(evals.read_text())
    for c in data["checkpoints"]:
        for judge in data["judges"]:
            for part in ("judge", "baseline_judge", "win_rate", "lc_win_rate"):
                for k, v in c[part].get(judge, {}).items():
                    if k in ("mean", "stderr", "rate", "low", "high"):
                        expected[f"{c['name']}/{judge}/{part}/{k}"] = fmt(v)
        expected.update({f"{c['name']}/kl/{k}": fmt(v) for k, v in c["kl"].items()})
        expected.update({f"{c['name']}/length/{k}": fmt(v) for k, v in c["length"].items()})
    expected["agreement/vader~rm/spearman"] = "0.660"
    assert {k: page["keys"].get(k) for k in expected} == expected
    assert page["keys"]["kto-b/step 10/judge_mean"] == "0.200"
    # Text from runs is shown as text: no script or markup of theirs runs or renders.
    assert page["scripts"] == 0 and page["bold"] == 0
    assert any(HOSTILE in cell for table in page["samples"] for row in table for cell in row)
    html = out.read_text()
    assert HOSTILE not in html and not re.search(r"(src|href)=\"(?!data:image/png;base64,|#)|url\(", html)
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', html):
        assert base64.b64decode(uri)[:8] == b"\x89PNG\r\n\x1a\n"


def test_score_at_equal_kl_interpolates_between_bracketing_checkpoints():
    points = [
        Point("before", 0, 0.20, 0.03, 0.0, 0.0),
        Point("step 50", 50, 0.30, 0.04, 1.0, 0.1),
        Point("after", 100, 0.50, 0.04, 3.0, 0.2),
    ]
    score, se = score_at_kl(points, 2.0)  # halfway from step 50 to 100
    assert score == pytest.approx(0.40)
    assert se == pytest.approx(math.hypot(0.5 * 0.04, 0.5 * 0.04))
    assert score_at_kl(points, 1.0) == (pytest.approx(0.30), pytest.approx(0.04))
    assert score_at_kl(points, 0.25)[0] == pytest.approx(0.225)
    assert score_at_kl(points, 3.5) is None  # beyond the run's reach
    other = [Point("before", 0, 0.2, 0.03, 0.0, 0.0), Point("after", 100, 0.4, 0.04, 2.0, 0.1)]
    assert common_kl_levels([points, other]) == [0.5, 1.0, 1.5, 2.0]
    assert common_kl_levels([points]) == []  # one run: nothing to compare
    reach = [Point("before", 0, 0.2, 0.03, 0.0, 0.0), Point("after", 100, 0.4, 0.04, 2.8795, 0.1)]
    levels = common_kl_levels([points, reach])  # 2.8795 would round up, past the run's last checkpoint
    assert levels[-1] == 2.87 and all(score_at_kl(reach, kl) is not None for kl in levels)
