"""Online loops on the tiny model: two rounds end to end, a resume from a killed round, and failures that
keep (or put back) what they must."""

from __future__ import annotations

import json
import threading
from http.server import HTTPServer
from types import SimpleNamespace

import pytest
import yaml

from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.evaluation.ai_judges import HTTPJudge
from prospect.online.labellers import JudgeLabeller
from prospect.online.rounds import run_loop
from prospect.online.session import SamplingSession, nested_run
from prospect.recipe import load_config
from tests.helpers import tiny_overrides
from tests.test_cli import run_cli
from tests.test_labellers import StubJudge

REWARD = "tests.test_loops:reward_letters"


def reward_letters(prompt, completion: str) -> float:
    """A dense reward the tiny model's random text varies on: how many e's it has."""
    return float(completion.count("e"))


REWARD_BROKEN = False  # set by a test: the reward below then fails, as a buggy reward function would


def reward_unless_broken(prompt, completion: str) -> float | str:
    return "n/a" if REWARD_BROKEN else reward_letters(prompt, completion)


ONE_ROUND = {  # a one-round KTO loop whose reward can be broken
    "loss.name": "kto",
    "loop.threshold": "mean",
    "loop.rounds": 1,
    "train.max_steps": 1,
    "online.reward_function": "tests.test_loops:reward_unless_broken",
}


def loop_overrides(tiny_model_dir, data, out, **extra):
    values = {
        "online.reward_function": REWARD,
        "online.samples_per_prompt": 4,
        "online.max_new_tokens": 6,
        "loop.rounds": 2,
        "train.max_steps": 2,
        "train.batch_size": 2,
        **extra,
    }
    return tiny_overrides(tiny_model_dir, data, out, **values)


def loop_config(tiny_model_dir, data, out, **extra):
    return load_config(None, loop_overrides(tiny_model_dir, data, out, **extra))


def rounds(run):
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


def trained_from(run, k, name="train"):
    return yaml.safe_load((run / f"round-{k:02d}" / name / "config.yaml").read_text())


@pytest.mark.parametrize(
    ("loss", "extra"),
    [
        ("kto", {"loop.threshold": "mean"}),
        ("dpo", {"loop.pair_selection": "random"}),
    ],
)
def test_iterative_rounds(loss, extra, tiny_model_dir, kto_file, tmp_path):
    run = tmp_path / loss
    run_loop(loop_config(tiny_model_dir, kto_file, run, **{"loss.name": loss, **extra}))
    assert [r["round"] for r in rounds(run)] == [1, 2]
    first, second = trained_from(run, 1), trained_from(run, 2)
    assert first["model"]["name"] == str(tiny_model_dir)
    assert second["model"]["name"] == str(run / "round-01" / "train" / "final")  # round 2 starts from round 1
    assert second["train"]["reference_model"] is None  # ... and its reference is round 1's policy
    data = [json.loads(line) for line in (run / "round-02" / "data.jsonl").read_text().splitlines()]
    assert data and ({"label"} <= set(data[0]) if loss == "kto" else {"chosen", "rejected"} <= set(data[0]))
    samples = [json.loads(line) for line in (run / "round-01" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(len(s["completions"]) == 4 == len(s["scores"]) for s in samples)


def test_base_reference(tiny_model_dir, kto_file, tmp_path):
    run = tmp_path / "base-ref"
    run_loop(
        loop_config(
            tiny_model_dir,
            kto_file,
            run,
            **{"loss.name": "kto", "loop.reference": "base", "loop.threshold": "mean"},
        )
    )
    assert trained_from(run, 2)["train"]["reference_model"] == str(tiny_model_dir)


def test_rest_improves_at_rising_thresholds(tiny_model_dir, kto_file, tmp_path):
    run = tmp_path / "rest"
    run_loop(
        loop_config(
            tiny_model_dir,
            kto_file,
            run,
            **{
                "loss.name": "sft",
                "loop.kind": "rest",
                "loop.improve_thresholds": "0,1",
                "online.samples_per_prompt": 8,
            },
        )
    )
    for k in (1, 2):
        improve = [
            [json.loads(x) for x in (run / f"round-{k:02d}" / f"improve-{i}.jsonl").read_text().splitlines()]
            for i in (1, 2)
        ]
        assert all(r["score"] >= 0 for r in improve[0]) and all(r["score"] >= 1 for r in improve[1])
        assert len(improve[1]) <= len(improve[0])
        assert trained_from(run, k, "improve-2")["model"]["name"] == str(
            run / f"round-{k:02d}" / "improve-1" / "final"
        )


def test_rest_em_retrains_the_base_model(tiny_model_dir, kto_file, tmp_path):
    run = tmp_path / "rest-em"
    run_loop(
        loop_config(
            tiny_model_dir,
            kto_file,
            run,
            **{
                "loss.name": "sft",
                "loop.kind": "rest_em",
                "loop.threshold_value": 0.0,
                "online.samples_per_prompt": 2,
            },
        )
    )
    assert trained_from(run, 2)["model"]["name"] == str(tiny_model_dir)  # the M-step starts from the base
    assert rounds(run)[1]["policy"] == str(run / "round-02" / "train" / "final")


def test_constitutional_revisions(tiny_model_dir, kto_file, tmp_path):
    constitution = tmp_path / "constitution.txt"
    constitution.write_text("# principles\nBe kind.\nBe brief.\n")
    run = tmp_path / "cai"
    run_loop(
        loop_config(
            tiny_model_dir,
            kto_file,
            run,
            **{
                "loss.name": "sft",
                "loop.kind": "constitutional",
                "loop.constitution": str(constitution),
                "online.samples_per_prompt": 1,
                "loop.rounds": 1,
            },
        )
    )
    rows = [json.loads(x) for x in (run / "round-01" / "data.jsonl").read_text().splitlines()]
    assert rows and {"original", "critique", "completion", "principle"} <= set(rows[0])
    assert {r["principle"] for r in rows} <= {"Be kind.", "Be brief."}
    with pytest.raises(UserError, match=r"needs loop\.constitution"):
        run_loop(
            loop_config(
                tiny_model_dir,
                kto_file,
                tmp_path / "x",
                **{"loss.name": "sft", "loop.kind": "constitutional"},
            )
        )


def test_rlaif_with_an_http_judge(tiny_model_dir, kto_file, tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), StubJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    try:
        run = tmp_path / "rlaif"
        run_loop(
            loop_config(
                tiny_model_dir,
                kto_file,
                run,
                **{
                    "loss.name": "dpo",
                    "online.reward_function": None,
                    "loop.judge": "http",
                    "loop.rounds": 1,
                    "loop.judge_url": f"http://127.0.0.1:{server.server_address[1]}/v1",
                    "loop.judge_model": "stub",
                    "loop.judge_key_env": "JUDGE_KEY",
                },
            )
        )
    finally:
        server.shutdown()
    stats = rounds(run)[0]
    assert stats["judge_calls"] == 12 and stats["judge_malformed"] == 0  # 6 prompts, each pair in both orders
    assert (run / "round-01" / "train" / "final" / "model.safetensors").exists()


def test_sampling_session_batches_by_online_batch_size_and_rotates_prompts(
    tiny_model_dir, kto_file, tmp_path
):
    every = loop_config(tiny_model_dir, kto_file, tmp_path / "a", **{"eval.batch_size": 5})
    all_prompts = SamplingSession(every, str(tiny_model_dir), window=0, seed=0)
    assert all_prompts.sampler.batch_size == every.online.batch_size == 32  # not eval.batch_size
    values = {"online.batch_size": 3, "eval.batch_size": 5, "online.prompts": 4}
    windowed = loop_config(tiny_model_dir, kto_file, tmp_path / "b", **values)
    second = SamplingSession(windowed, str(tiny_model_dir), window=1, seed=0)
    assert second.sampler.batch_size == 3
    prompts = [it.prompt for it in all_prompts.items]
    assert len(prompts) == 6 and [it.prompt for it in second.items] == prompts[4:] + prompts[:2]


def test_nested_run_trains_on_the_data_file_and_resumes_a_started_run(tiny_model_dir, kto_file, tmp_path):
    config = loop_config(tiny_model_dir, kto_file, tmp_path / "outer", **{"loss.name": "sft"})
    data, out = tmp_path / "kept.jsonl", tmp_path / "outer" / "round-01" / "train"
    inner = nested_run(config, data, out, reference_model="base-model")
    assert (inner.data.train, inner.data.train_split, inner.data.format) == (str(data), "train", "auto")
    assert inner.data.eval == str(kto_file) and inner.data.limit == 0  # evaluates on the outer run's prompts
    assert (inner.train.output_dir, inner.train.resume, inner.train.overwrite) == (str(out), False, False)
    assert inner.train.reference_model == "base-model" and inner.model == config.model
    out.mkdir(parents=True)
    (out / "prospect-run.json").write_text("{}")
    assert nested_run(config, data, out).train.resume
    assert not nested_run(config, data, out, resume=False).train.resume
    assert nested_run(config, data, out, data_format="completions").data.format == "completions"


def test_a_killed_round_resumes(tiny_model_dir, kto_file, tmp_path, monkeypatch):
    run = tmp_path / "killed"
    config = loop_config(
        tiny_model_dir, kto_file, run, **{"loss.name": "kto", "loop.threshold": "mean", "train.save_every": 1}
    )
    real_train = Trainer.train
    calls = []

    def train_then_die(self):
        calls.append(self.run_dir)
        if len(calls) == 2:
            self.callbacks.append(lambda trainer, result: (_ for _ in ()).throw(KeyboardInterrupt()))
        return real_train(self)

    monkeypatch.setattr(Trainer, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_loop(config)
    assert (run / "round-01" / "DONE").exists() and not (run / "round-02" / "DONE").exists()
    samples_before = (run / "round-02" / "samples.jsonl").read_text()
    monkeypatch.setattr(Trainer, "train", real_train)
    resumed = loop_config(
        tiny_model_dir,
        kto_file,
        run,
        **{"loss.name": "kto", "loop.threshold": "mean", "train.save_every": 1, "train.resume": True},
    )
    run_loop(resumed)
    assert (run / "round-02" / "samples.jsonl").read_text() == samples_before  # round 2 was not sampled again
    assert [r["round"] for r in rounds(run)] == [1, 2]
    metrics = [
        json.loads(x)["step"] for x in (run / "round-02" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics == [1, 2]


def files(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_run_until_round_one_has_labelled_samples(
    tiny_model_dir, kto_file, tmp_path, monkeypatch
):
    run, replaced = tmp_path / "run", tmp_path / ".run.replaced"
    run_loop(loop_config(tiny_model_dir, kto_file, run, **ONE_ROUND))
    finished = files(run)
    overwrite = loop_config(tiny_model_dir, kto_file, run, **ONE_ROUND, **{"train.overwrite": True})

    def broken_sampler(self):
        raise RuntimeError("the sampler broke")

    with monkeypatch.context() as patch:
        patch.setattr(SamplingSession, "sample", broken_sampler)
        with pytest.raises(RuntimeError, match="the sampler broke"):
            run_loop(overwrite)
        with pytest.raises(RuntimeError, match="the sampler broke"):
            run_loop(loop_config(tiny_model_dir, kto_file, tmp_path / "new", **ONE_ROUND))
    assert files(run) == finished and not replaced.exists()  # put back; nothing half-made left behind
    assert not (tmp_path / "new").exists()

    monkeypatch.setattr("tests.test_loops.REWARD_BROKEN", True)
    with pytest.raises(UserError, match=r"^round 1: labelling failed: .*returned 'n/a'"):
        run_loop(overwrite)
    assert files(replaced) == finished  # the old run is kept aside until the new one has labelled samples
    new_round = run / "round-01"
    assert (new_round / "generations.jsonl").is_file() and not (new_round / "samples.jsonl").exists()

    monkeypatch.setattr("tests.test_loops.REWARD_BROKEN", False)
    run_loop(loop_config(tiny_model_dir, kto_file, run, **ONE_ROUND, **{"train.resume": True}))
    assert not replaced.exists() and [r["round"] for r in rounds(run)] == [1]


def test_a_failed_labelling_keeps_the_samples_and_resume_labels_them(
    tiny_model_dir, kto_file, tmp_path, monkeypatch, capsys
):
    run, straight = tmp_path / "run", tmp_path / "straight"
    monkeypatch.setattr("tests.test_loops.REWARD_BROKEN", True)
    code, _, err = run_cli(["loop", *loop_overrides(tiny_model_dir, kto_file, run, **ONE_ROUND)], capsys)
    kept = run / "round-01" / "generations.jsonl"
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: round 1: labelling failed: ") and "returned 'n/a'" in last
    assert f"the samples are kept in {kept}" in last and "--resume" in last and "Traceback" not in err
    drawn = kept.read_text()

    monkeypatch.setattr("tests.test_loops.REWARD_BROKEN", False)
    real_sample, sampled = SamplingSession.sample, []
    monkeypatch.setattr(SamplingSession, "sample", lambda self: sampled.append(1) or real_sample(self))
    code, _, _ = run_cli(
        ["loop", *loop_overrides(tiny_model_dir, kto_file, run, **ONE_ROUND), "--resume"], capsys
    )
    assert code == 0 and not sampled and kept.read_text() == drawn  # labelled again, not sampled again
    assert [r["round"] for r in rounds(run)] == [1]
    run_loop(loop_config(tiny_model_dir, kto_file, straight, **ONE_ROUND))  # the same loop, never interrupted
    for name in ("generations.jsonl", "samples.jsonl", "data.jsonl"):
        assert (run / "round-01" / name).read_text() == (straight / "round-01" / name).read_text()


def test_each_process_labels_its_own_share_of_the_gathered_samples():
    rows = list(range(7))  # one per prompt, gathered in process order from prompts dealt out round-robin
    for n in (1, 2, 3):
        shares = [
            SamplingSession.own_share(
                SimpleNamespace(state=SimpleNamespace(num_processes=n, process_index=i)), rows
            )
            for i in range(n)
        ]
        assert [len(share) for share in shares] == [len(rows[i::n]) for i in range(n)]
        assert [row for share in shares for row in share] == rows


def test_a_judge_that_never_answers_stops_the_labelling(monkeypatch):
    """A judge that gave up on some items labels them failed; one that answered nothing fails the round."""
    monkeypatch.setenv("JUDGE_KEY", "sk-test-secret")
    unreachable = HTTPJudge("http://127.0.0.1:9/v1", "m", "JUDGE_KEY", timeout=1, retries=0)
    with pytest.raises(UserError, match="no reply to any of 2 requests") as error:
        JudgeLabeller(unreachable).rate(["a?", "b?"], ["x", "y"])
    assert "sk-test-secret" not in str(error.value)
