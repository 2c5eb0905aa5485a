"""`prospect eval` end to end on the tiny model: the JSON the report reads, win rates recomputed from the
samples it holds, an HTTP judge comparing in both orders that agrees with a scoring judge of the same taste,
a checkpoint against itself, a task's accuracy, --help, and bad input as one-line errors."""

from __future__ import annotations

import json
import statistics
import threading
from http.server import HTTPServer

import pytest

from prospect.engine.trainer import Trainer
from prospect.evaluation import checkpoints
from prospect.recipe import load_config
from tests.helpers import TOPICS, tiny_overrides, unpaired_rows, write_jsonl
from tests.test_cli import run_cli
from tests.test_labellers import StubJudge

E_COUNT = "verifier:tests.test_eval_cli:e_count"
FAST = ["--max-new-tokens", "12", "--bootstrap", "300", "--precision", "fp32"]


def e_count(prompt, completion: str) -> float:
    """A scoring judge with the stub HTTP judge's taste: it likes the letter e."""
    return float(completion.count("e"))


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = write_jsonl(root / "kto.jsonl", unpaired_rows())
    run = root / "run"
    Trainer(load_config(None, tiny_overrides(tiny_model_dir, data, run, **{"train.max_steps": 30}))).train()
    prompts = [{"prompt": f"Review {t}."} for t in TOPICS]
    prompts += [{"prompt": [{"role": "user", "content": f"Review {t}."}]} for t in TOPICS]
    return run, write_jsonl(root / "prompts.jsonl", prompts)


@pytest.fixture
def stub_judge(monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def by_hand(pairs: list[tuple[float, float]]) -> tuple[int, int, int, float]:
    wins = sum(a > b for a, b in pairs)
    ties = sum(a == b for a, b in pairs)
    return wins, ties, len(pairs) - wins - ties, (wins + ties / 2) / len(pairs)


def test_eval_writes_the_json_the_report_reads(trained_run, tiny_model_dir, stub_judge, tmp_path, capsys):
    run, prompts = trained_run
    out = tmp_path / "eval.json"
    http = f"http:{stub_judge}"
    judges = f"vader,{E_COUNT},{http}"
    asked = len(StubJudge.seen)
    argv = ["eval", str(run), "--prompts", str(prompts), "--judges", judges, "-o", str(out), *FAST]
    argv += ["--judge-model", "stub", "--judge-key-env", "JUDGE_KEY"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "win rate [95% CI]" in stdout and f"wrote {out}" in stdout
    report = json.loads(out.read_text())
    assert report["prompts"] == {"source": str(prompts), "count": 12}
    assert report["baseline"] == {"name": "reference", "path": str(tiny_model_dir)}
    assert report["judges"] == ["vader", E_COUNT, http]
    (entry,) = report["checkpoints"]
    assert (entry["name"], entry["path"]) == (str(run), str(run / "final"))
    samples = entry["samples"]
    assert len(samples) == 12 and {"Review the space movie."} <= {s["prompt"] for s in samples}
    assert any(s["completion"] != s["baseline"] for s in samples)  # trained: it samples otherwise
    for s in samples:
        assert set(s["scores"]) == set(s["baseline_scores"]) == set(report["judges"])
        assert s["scores"][E_COUNT] == s["completion"].count("e")
        assert s["baseline_scores"][E_COUNT] == s["baseline"].count("e")
        assert 1 <= s["tokens"] <= 12
    pairs = [(s["scores"][E_COUNT], s["baseline_scores"][E_COUNT]) for s in samples]
    wins, ties, losses, rate = by_hand(pairs)
    win = entry["win_rate"][E_COUNT]
    assert (win["wins"], win["ties"], win["losses"], win["unjudged"]) == (wins, ties, losses, 0)
    assert win["rate"] == pytest.approx(rate) and win["low"] <= rate <= win["high"]
    assert entry["judge"][E_COUNT]["mean"] == pytest.approx(statistics.fmean(a for a, _ in pairs))
    assert entry["baseline_judge"][E_COUNT]["mean"] == pytest.approx(statistics.fmean(b for _, b in pairs))
    # The stub HTTP judge likes e's too; asked in both orders, it gives the same verdicts per prompt.
    assert len(StubJudge.seen) - asked == 2 * 12
    http_win = entry["win_rate"][http]
    assert (http_win["wins"], http_win["ties"], http_win["losses"]) == (wins, ties, losses)
    assert entry["judge"][http]["mean"] == pytest.approx(rate)
    assert entry["baseline_judge"][http]["mean"] == pytest.approx(1 - rate)
    assert report["agreement"][f"{E_COUNT}~{http}"]["verdict_agreement"] == 1.0
    assert set(report["agreement"]) == {f"vader~{E_COUNT}", f"vader~{http}", f"{E_COUNT}~{http}"}
    for judge in report["judges"]:
        lc = entry["lc_win_rate"][judge]
        assert lc["low"] <= lc["rate"] <= lc["high"]
    assert entry["length"]["mean"] == pytest.approx(statistics.fmean(s["tokens"] for s in samples))
    assert entry["length"]["baseline_mean"] == pytest.approx(
        statistics.fmean(s["baseline_tokens"] for s in samples)
    )
    assert entry["kl"]["stderr"] > 0 and entry["accuracy"] is None
    assert report["ai_judge_calls"][http] == {"judge_calls": 24, "judge_malformed": 0}


def test_a_checkpoint_against_itself_ties_everywhere_at_zero_kl(
    tiny_model_dir, trained_run, tmp_path, capsys, monkeypatch
):
    """The base model as the checkpoint, the baseline and the reference: the same seed samples the same
    completions, so every prompt ties and the KL is exactly 0. The tiny model judging in both orders gives no
    readable verdict: every prompt is unjudged, counted, and no win rate is made up."""
    _, prompts = trained_run
    out = tmp_path / "self.json"
    model = str(tiny_model_dir)
    argv = ["eval", model, "--baseline", model, "--reference", model, "--prompts", str(prompts)]
    argv += ["--num-prompts", "4", "--judges", f"{E_COUNT},llm:{model}", "-o", str(out), *FAST]
    loads = []
    real_load = checkpoints.load_model
    monkeypatch.setattr(checkpoints, "load_model", lambda config: loads.append(config) or real_load(config))
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    assert len(loads) == 1  # one model in three roles, loaded once
    report = json.loads(out.read_text())
    (entry,) = report["checkpoints"]
    assert report["baseline"] == {"name": model, "path": model}
    assert all(s["completion"] == s["baseline"] for s in entry["samples"])
    win = entry["win_rate"][E_COUNT]
    assert (win["rate"], win["low"], win["high"], win["ties"]) == (0.5, 0.5, 0.5, 4)
    assert entry["lc_win_rate"][E_COUNT]["rate"] == 0.5
    assert entry["kl"] == {"mean": 0.0, "stderr": 0.0}
    llm = entry["win_rate"][f"llm:{model}"]
    assert llm["unjudged"] == 4 and llm["rate"] is None and llm["wins"] + llm["ties"] + llm["losses"] == 0
    assert report["ai_judge_calls"][f"llm:{model}"]["judge_calls"] == 8


def test_a_task_reports_exact_match_accuracy(trained_run, tmp_path, capsys):
    run, _ = trained_run
    out = tmp_path / "arith.json"
    argv = ["eval", str(run), "--prompts", "arithmetic", "--num-prompts", "3", "--judges", "exact-match"]
    code, _, err = run_cli([*argv, "-o", str(out), *FAST], capsys)
    assert code == 0, err
    (entry,) = json.loads(out.read_text())["checkpoints"]
    assert "Answer: <number>" in entry["samples"][0]["prompt"]
    scores = [s["scores"]["exact-match"] for s in entry["samples"]]
    assert set(scores) <= {0.0, 1.0} and entry["accuracy"]["mean"] == pytest.approx(statistics.fmean(scores))
    baseline = [s["baseline_scores"]["exact-match"] for s in entry["samples"]]
    assert entry["baseline_accuracy"]["mean"] == pytest.approx(statistics.fmean(baseline))


def test_eval_help_names_its_flags_and_judges(capsys):
    code, out, _ = run_cli(["eval", "--help"], capsys)
    assert code == 0
    for text in ("--baseline", "--reference", "--prompts", "--judges", "reward:PATH", "llm:PATH", "http:URL"):
        assert text in out
    code, out, _ = run_cli(["--help"], capsys)
    assert "    eval" in out


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["{tmp}/nope"], "checkpoint {tmp}/nope: no such run directory or checkpoint"),
        (["{run}", "--judges", "vader,gpt5"], "--judges: unknown judge 'gpt5'; expected vader, exact-match"),
        (["{run}", "--judges", "reward:{tmp}/rm"], "--judges reward:{tmp}/rm: no such directory"),
        (["{run}", "--judges", "verifier:nowhere:f"], "--judges verifier='nowhere:f': cannot import it"),
        (["{run}", "--judges", "http:https://x/v1"], "--judges http:https://x/v1 needs --judge-model"),
        (["{model}"], "checkpoint {model}: not in a run directory, so its reference model is unknown"),
        (["{run}", "--prompts", "{tmp}/p.jsonl"], "--prompts {tmp}/p.jsonl: no such file"),
        (["{run}", "--num-prompts", "0"], "--num-prompts 0: expected at least 1"),
        (["{run}", "--baseline", "{tmp}/base"], "--baseline {tmp}/base: no such run directory"),
        (["{run}", "--max-new-tokens", "0"], "prospect eval: eval.max_new_tokens"),
    ],
)
def test_bad_input_is_one_line(args, expected, trained_run, tiny_model_dir, tmp_path, capsys):
    run, _ = trained_run
    values = {"tmp": tmp_path, "run": run, "model": tiny_model_dir}
    out = tmp_path / "out.json"
    argv = ["eval", *(a.format(**values) for a in args), "-o", str(out)]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith(f"error: {expected.format(**values)}") and err.count("\n") == 1
    assert not out.exists()
    out.write_text("{}")
    code, _, err = run_cli(["eval", str(run), "-o", str(out)], capsys)
    assert err == f"error: {out}: exists; pass --overwrite to replace it\n"


def test_chat_template_applies_to_models_outside_a_run_only(trained_run, tiny_model_dir):
    """A base model given by name or directory takes --chat-template; a run's checkpoint keeps its own."""
    run, _ = trained_run
    outside = checkpoints.find_model(str(tiny_model_dir), "--baseline", chat_template="gemma")
    inside = checkpoints.find_model(str(run), "checkpoint", chat_template="gemma")
    assert outside.config.chat_template == "gemma" and outside.run is None
    assert inside.config.chat_template is None and inside.run is not None
    by_name = checkpoints.find_model("gemma3-270m", "--baseline", chat_template="gemma")
    assert (by_name.config.name, by_name.config.chat_template) == ("gemma3-270m", "gemma")
    reference = checkpoints.reference_of(inside, str(tiny_model_dir), False, "zephyr")
    assert reference.chat_template == "zephyr"
