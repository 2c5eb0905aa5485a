"""ICDPO on the tiny model: the score S against plain transformers forwards, the best candidate kept, the
two-stage retriever (BM25 + hidden-state re-rank) against the random baseline, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from prospect.cli import run
from prospect.config import DataConfig, ModelConfig
from prospect.data.formats import Example
from prospect.data.pipeline import read_training
from prospect.errors import UserError
from prospect.models.loading import load_model
from prospect.models.scoring import TokenScorer
from prospect.online.icdpo import ICDPO, Candidate, best_candidate, run_icdpo
from prospect.online.icdpo_options import ICDPOConfig, ICDPORequest
from prospect.online.retrieval import (
    Demonstration,
    HiddenStateEmbedder,
    LexicalRetriever,
    RandomRetriever,
    demonstrations,
    make_retriever,
)
from tests.helpers import paired_rows, unpaired_rows, write_jsonl

QUERY = [{"role": "user", "content": "Review the space movie."}]
TINY = {"max_new_tokens": 5, "max_context_tokens": 160, "precision": "fp32", "samples": 3}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """prospect's loading of the tiny model, and the same weights as a plain transformers model."""
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir)))
    model.requires_grad_(False)
    plain = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, tokenizer, plain, AutoTokenizer.from_pretrained(tiny_model_dir)


def hand_logp(plain, tokenizer, messages: list[dict], completion: list[int]) -> float:
    """log p(completion | messages rendered by the chat template): one plain forward, full logits."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    context = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + completion])
    with torch.no_grad():
        logps = plain(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    targets = ids[0, 1:]
    return float(logps[torch.arange(len(targets)), targets][len(context) - 1 :].sum())


def shown_messages(demos: list[Demonstration], side: str) -> list[dict]:
    """The demonstrations as earlier turns, the first retrieved (most relevant) nearest the prompt."""
    return [m for d in reversed(demos) for m in d.prompt + d.response(side)]


@pytest.mark.parametrize("amateur", ["plain", "dispreferred"])
def test_score_is_expert_minus_amateur_log_prob_by_hand(tiny, amateur):
    model, tokenizer, plain, plain_tokenizer = tiny
    rows = [
        {"prompt": user("Review the space movie."), "completion": assistant("It was lovely."), "label": True},
        {
            "prompt": user("Tell me of a space movie."),
            "completion": assistant("It was great."),
            "label": True,
        },
        {"prompt": user("A space movie, please."), "completion": assistant("It was dull."), "label": False},
        {"prompt": user("Describe the cartoon."), "completion": assistant("It was warm."), "label": True},
        {"prompt": user("Describe the thriller."), "completion": assistant("It was cold."), "label": False},
    ]
    demos = demonstrations(
        [Example(r["prompt"], r["completion"], r["label"], f"rows:{i}") for i, r in enumerate(rows)]
    )
    options = ICDPOConfig(demonstrations=2, amateur=amateur, retriever="bm25", **TINY)
    icdpo = ICDPO(model, tokenizer, LexicalRetriever(demos, 20), options)
    choice = icdpo.choose(QUERY, "query", seed=3)
    assert [d.location for d in choice.shown] == ["rows:1", "rows:3"]  # the query's own prompt is never shown
    expected_amateur = ["rows:2", "rows:4"] if amateur == "dispreferred" else []
    assert [d.location for d in choice.amateur_shown] == expected_amateur
    assert len(choice.candidates) == 3
    for c in choice.candidates:
        expert = hand_logp(
            plain, plain_tokenizer, shown_messages(choice.shown, "preferred") + QUERY, c.token_ids
        )
        against = shown_messages(choice.amateur_shown, "dispreferred") + QUERY
        amateur_logp = hand_logp(plain, plain_tokenizer, against, c.token_ids)
        assert c.expert_logp == pytest.approx(expert, abs=1e-4)
        assert c.amateur_logp == pytest.approx(amateur_logp, abs=1e-4)
        assert c.score == pytest.approx(expert - amateur_logp, abs=2e-4)
        assert c.expert_logp != pytest.approx(c.amateur_logp, abs=1e-3)  # the demonstrations change it
    assert choice.best is max(choice.candidates, key=lambda c: c.score)


def test_best_candidate_is_the_highest_score_not_the_highest_expert_log_prob():
    def candidate(expert: float, amateur: float) -> Candidate:
        return Candidate([1], f"{expert}/{amateur}", True, expert, amateur, expert - amateur)

    candidates = [candidate(-1.0, -2.0), candidate(-3.0, -6.0), candidate(-0.5, -0.6)]
    assert best_candidate(candidates) is candidates[1]


def request(tmp_path, data: DataConfig, model: str = "smollm2", **options) -> ICDPORequest:
    """A run on the tiny settings (bad-input tests fail before the model loads)."""
    return ICDPORequest(
        str(tmp_path / "icdpo.jsonl"), ModelConfig(name=model), data, ICDPOConfig(**{**TINY, **options})
    )


@pytest.fixture
def feedback(tmp_path):
    """Demonstrations (three topics desirable, three undesirable) and held-out prompts in their own file."""
    demos = write_jsonl(tmp_path / "demos.jsonl", unpaired_rows(24, conversational=True))
    prompts = [{"prompt": QUERY}, {"prompt": user("Review the old western.")}, {"prompt": user("Say hi.")}]
    return DataConfig(train=str(demos), eval=str(write_jsonl(tmp_path / "prompts.jsonl", prompts)))


@pytest.mark.parametrize("retriever", ["two-stage", "random"])
def test_run_icdpo_writes_the_best_candidate_of_each_prompt(tiny_model_dir, tmp_path, feedback, retriever):
    req = request(tmp_path, feedback, str(tiny_model_dir), retriever=retriever, num_prompts=3)
    summary = run_icdpo(req)
    rows = [json.loads(line) for line in (tmp_path / "icdpo.jsonl").read_text().splitlines()]
    assert len(rows) == summary["prompts"] == 3
    demo_rows = (tmp_path / "demos.jsonl").read_text().splitlines()
    for row in rows:
        scores = [c["score"] for c in row["candidates"]]
        assert len(scores) == 3
        assert row["score"] == max(scores)
        assert row["completion"] == row["candidates"][scores.index(max(scores))]["completion"]
        for c in row["candidates"]:
            assert c["score"] == pytest.approx(c["expert_logp"] - c["amateur_logp"])
        assert len(row["demonstrations"]) == 2 and row["seconds"] > 0
        for location in row["demonstrations"]:
            shown = json.loads(demo_rows[int(location.rsplit(":", 1)[1]) - 1])
            assert shown["label"] is True and shown["prompt"] != row["prompt"]
    saved = json.loads((tmp_path / "icdpo.summary.json").read_text())
    assert saved["seconds_per_prompt"] > 0 and saved["pool"] == {"preferred": 12, "dispreferred": 12}
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        run_icdpo(req)


POOL = [
    "Review the space movie.",  # the query's own prompt: never returned
    "Tell me about a space movie with robots.",
    "Describe the old western.",
    "Summarize the new comedy.",
    "Explain the war drama.",
    "Praise the cartoon.",
    "Rate the thriller.",
]


def pool(extra: int = 0) -> list[Demonstration]:
    prompts = POOL + [f"Describe picture number {i}." for i in range(extra)]
    return [
        Demonstration(user(p), f"pool:{i}", assistant("It was good."), assistant("It was bad."))
        for i, p in enumerate(prompts)
    ]


def test_two_stage_retrieval_finds_the_shared_words_never_the_query_itself(tiny):
    model, tokenizer, _, _ = tiny
    embed = HiddenStateEmbedder(TokenScorer(model), tokenizer)
    retriever = make_retriever("two-stage", pool(), 0, 20, embed)
    assert [d.location for d in retriever.retrieve(QUERY, 1, "preferred")] == ["pool:1"]
    assert "pool:0" not in [d.location for d in retriever.retrieve(QUERY, 6, "preferred")]
    assert "pool:0" not in [d.location for d in retriever.retrieve("Review the space movie.", 6, "preferred")]


def test_the_re_rank_orders_the_bm25_shortlist_by_embedding():
    demos = pool()
    query = user("Describe the robots western.")  # shares "western" with pool:2, "robots" with pool:1
    closer = {POOL[1]: [0.0, 1.0], query[0]["content"]: [0.1, 1.0]}  # the re-rank prefers BM25's second

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.tensor([closer.get(t, [1.0, 0.0]) for t in texts])

    lexical = [d.location for d in LexicalRetriever(demos, 20).retrieve(query, 2, "preferred")]
    reranked = [d.location for d in LexicalRetriever(demos, 20, embed).retrieve(query, 2, "preferred")]
    assert sorted(lexical) == sorted(reranked) == ["pool:1", "pool:2"]
    assert reranked == ["pool:1", "pool:2"] and lexical == ["pool:2", "pool:1"]


def test_the_random_baseline_differs_is_seeded_and_never_shows_the_query():
    demos = pool(extra=30)
    lexical = [d.location for d in LexicalRetriever(demos, 20).retrieve(QUERY, 3, "preferred")]
    drawn = [
        [d.location for d in RandomRetriever(demos, seed).retrieve(QUERY, 3, "preferred")]
        for seed in range(40)
    ]
    assert drawn[0] == [d.location for d in RandomRetriever(demos, 0).retrieve(QUERY, 3, "preferred")]
    assert drawn[0] != lexical and len({tuple(d) for d in drawn}) > 30
    assert all("pool:0" not in d for d in drawn)


def test_prompts_with_no_words_are_still_retrieved_but_match_nothing():
    demos = [
        Demonstration(text, f"d:{i}", "It was good.")
        for i, text in enumerate(["a", "Is it?", "A space movie"])
    ]
    retriever = LexicalRetriever(demos, 20)
    assert [d.location for d in retriever.retrieve("the space", 3, "preferred")] == ["d:2", "d:0", "d:1"]
    assert [d.location for d in retriever.retrieve("a", 3, "preferred")] == [
        "d:1",
        "d:2",
    ]  # "a" itself is left out


def test_unpaired_sides_come_from_their_own_rows(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", unpaired_rows(12, conversational=True))
    demos = demonstrations(read_training(DataConfig(train=str(path)), "unpaired", 0))
    retriever = LexicalRetriever(demos, 20)
    assert all(d.dispreferred is not None for d in retriever.retrieve(QUERY, 4, "dispreferred"))
    assert all(d.preferred is not None for d in retriever.retrieve(QUERY, 4, "preferred"))
    pairs = write_jsonl(tmp_path / "p.jsonl", paired_rows(6, conversational=True))
    both = demonstrations(read_training(DataConfig(train=str(pairs)), "paired", 0))
    assert len(both) == 6 and all(d.preferred and d.dispreferred for d in both)


def icdpo_cli(argv: list[str]) -> None:
    """`prospect icdpo ARGV` as the command line runs it; a user error is raised, not printed."""
    run(["icdpo", *argv])


def test_the_command_runs_with_its_flags(tiny_model_dir, tmp_path, feedback):
    out = tmp_path / "cli.jsonl"
    flags = {"--samples": 2, "--num-prompts": 1, "--max-new-tokens": 4, "--max-context-tokens": 160}
    icdpo_cli(
        ["--model", str(tiny_model_dir), "--data", feedback.train, "--eval-data", str(feedback.eval)]
        + [str(x) for pair in flags.items() for x in pair]
        + ["--precision", "fp32", "--amateur", "none", "-o", str(out)]
    )
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(row["candidates"]) == 2 and all(c["amateur_logp"] is None for c in row["candidates"])
    assert row["score"] == max(c["expert_logp"] for c in row["candidates"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--demonstrations", "0"],
            "prospect icdpo: icdpo.demonstrations: expected a whole number >= 1, got 0",
        ),
        (["--retriever", "dense"], "icdpo.retriever: expected one of two-stage, bm25, random"),
        (["--amateur", "base"], "icdpo.amateur: expected one of plain, dispreferred, none"),
        (["--top-p", "2"], "icdpo.top_p: expected a number in (0, 1]"),
        (["--shortlist", "1", "--demonstrations", "2"], "icdpo.shortlist: expected at least"),
    ],
)
def test_bad_flags_are_one_line_errors(tmp_path, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        icdpo_cli([*argv, "-o", str(tmp_path / "out.jsonl")])


def test_bad_feedback_rows_name_the_file_line_and_field(tmp_path):
    rows = unpaired_rows(6)
    rows[3]["label"] = "yes"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError, match=r"bad\.jsonl:4: field 'label': expected a boolean"):
        run_icdpo(request(tmp_path, DataConfig(train=str(bad))))


@pytest.mark.parametrize(
    ("label", "amateur", "missing"), [(False, "plain", "preferred"), (True, "dispreferred", "dispreferred")]
)
def test_feedback_without_the_needed_side_is_refused(tmp_path, label, amateur, missing):
    rows = [{**r, "label": label} for r in unpaired_rows(6)]
    path = write_jsonl(tmp_path / "one-sided.jsonl", rows)
    with pytest.raises(UserError, match=rf"one-sided\.jsonl: no {missing} responses"):
        run_icdpo(request(tmp_path, DataConfig(train=str(path)), amateur=amateur))
