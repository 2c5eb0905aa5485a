"""Nash-MD: the advantages by hand, the mixture sampler against the normalised geometric mixture computed
explicitly, a tiny policy that learns what the preference pays for, a killed run that resumes to the same
weights, and two processes that train as one."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from prospect.engine.factory import make_trainer
from prospect.engine.nash import NashTrainer
from prospect.errors import UserError
from prospect.losses import get_loss
from prospect.losses.nash import nash_md_advantages
from prospect.models.decoding import Mixture, decode
from prospect.models.sampling import SamplingParams
from prospect.recipe import load_config
from tests.helpers import build_model, miniature, tiny_overrides
from tests.test_kill_and_scale import cli, same, torchrun, weights


def test_advantages_by_hand():
    spec = get_loss("nash_md")
    params = spec.make_params({"beta": 0.1}, "test")
    preferences, kl = torch.tensor([[0.9], [0.2]]), torch.tensor([[1.0], [0.5]])
    torch.testing.assert_close(nash_md_advantages(preferences, kl, params), torch.tensor([[0.3], [-0.35]]))
    torch.testing.assert_close(nash_md_advantages(preferences, None, params), torch.tensor([[0.4], [-0.3]]))
    assert spec.loop == "nash" and spec.needs_reference  # the mixture needs the reference even at beta 0
    assert spec.resolved(spec.make_params({"beta": 0.0}, "test")).needs_reference


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_the_mixture_sampler_draws_the_normalised_geometric_mixture(weight):
    """The first sampled token's frequencies over 40,000 draws against softmax((1 - w) log pi + w log pi_ref)
    computed from the two models' full forwards; then two tokens, so the second step's mixture (each model
    with its own cache) is checked too."""
    policy, reference = build_model(32, seed=1), build_model(32, seed=2)
    with torch.no_grad():  # sharper next-token distributions than random weights give, far apart
        policy.model.norm.weight.mul_(12)
        reference.model.norm.weight.mul_(-12)  # its logits are roughly the policy's negated
    prompt = [5, 9, 3]
    with torch.no_grad():
        log_pi = policy(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
        log_ref = reference(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    expected = ((1 - weight) * log_pi + weight * log_ref).softmax(-1)
    torch.manual_seed(0)
    draws = 40_000
    out = decode(policy, [prompt], draws, 2, [], 0, mixture=Mixture(reference, weight))
    first = torch.bincount(torch.tensor([tokens[0] for tokens, _ in out]), minlength=32).float() / draws
    tv = lambda p, q: float((p - q).abs().sum() / 2)  # noqa: E731  total variation
    assert tv(first, expected) < 0.02
    assert tv(log_pi.exp(), log_ref.exp()) > 0.3  # the test tells the mixture from either model
    if 0 < weight < 1:
        assert min(tv(first, log_pi.exp()), tv(first, log_ref.exp())) > 0.1
    token = int(expected.argmax())  # the second token, after the likeliest first one
    with torch.no_grad():
        log_pi2 = policy(torch.tensor([[*prompt, token]])).logits[0, -1].log_softmax(-1)
        log_ref2 = reference(torch.tensor([[*prompt, token]])).logits[0, -1].log_softmax(-1)
    expected2 = ((1 - weight) * log_pi2 + weight * log_ref2).softmax(-1)
    seconds = torch.tensor([tokens[1] for tokens, _ in out if tokens[0] == token])
    second = torch.bincount(seconds, minlength=32).float() / len(seconds)
    assert len(seconds) > 2_000 and tv(second, expected2) < 0.05


def shortness(prompt, completion: str) -> float:
    return -float(len(completion))


def nash_options(**extra) -> dict:
    return {
        "loss.name": "nash_md",
        "online.preference": "verifier:tests.test_nash:shortness",  # the shorter completion wins
        "online.max_new_tokens": 6,
        **extra,
    }


def test_a_tiny_policy_learns_what_the_preference_pays_for(tiny_model_dir, kto_file, tmp_path):
    options = nash_options(
        **{
            "online.samples_per_prompt": 4,
            "loss.beta": 0.01,
            "train.batch_size": 6,
            "train.max_steps": 30,
            "train.learning_rate": 3e-3,
            "train.seed": 1,
        }
    )
    run = tmp_path / "run"
    trainer = make_trainer(load_config(None, tiny_overrides(tiny_model_dir, kto_file, run, **options)))
    assert isinstance(trainer, NashTrainer) and trainer.live_reference is not None
    prompts = [item.prompt_ids for item in trainer.data.items]
    params = SamplingParams(n=32, max_new_tokens=6, temperature=1.0, seed=5)

    def mean_characters() -> float:
        samples = [s for group in trainer.sampler.generate(prompts, params) for s in group]
        return sum(
            len(trainer.tokenizer.decode(s.token_ids, skip_special_tokens=True)) for s in samples
        ) / len(samples)

    before = mean_characters()
    trainer.train()
    after = mean_characters()
    assert after < before - 1.0, (before, after)  # measured: 11.6 -> 9.7 characters in 6 tokens
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "policy_loss",
        "kl",
        "opponent_length",
        "opponent_tokens",
        "unjudged",
        "sampled_tokens_per_s",
    ):
        assert key in lines[-1]


def test_nash_md_needs_a_preference_source(tiny_model_dir, kto_file, tmp_path):
    options = nash_options()
    del options["online.preference"]
    with pytest.raises(UserError, match=r"loss 'nash_md' is paid by a preference: set online.preference"):
        make_trainer(load_config(None, tiny_overrides(tiny_model_dir, kto_file, tmp_path / "run", **options)))
    options["online.preference"] = "pairwise:/no/such/model"
    with pytest.raises(UserError, match=r"online.preference pairwise:/no/such/model: no such directory"):
        make_trainer(load_config(None, tiny_overrides(tiny_model_dir, kto_file, tmp_path / "run", **options)))
    assert not (tmp_path / "run").exists()


RESUMABLE = {"loss.epochs": 2, "train.max_steps": 4, "train.batch_size": 2, "train.save_every": 1}


def test_a_killed_run_resumes_to_the_same_weights(tiny_model_dir, kto_file, tmp_path):
    options = nash_options(**RESUMABLE)
    straight = cli(tiny_overrides(tiny_model_dir, kto_file, tmp_path / "straight", **options))
    assert straight.returncode == 0, straight.stderr
    run = tmp_path / "killed"
    args = tiny_overrides(tiny_model_dir, kto_file, run, **options)
    killed = cli(args, env={"PROSPECT_FAULT": "step:3"})
    assert killed.returncode == -signal.SIGKILL
    resumed = cli([*args, "train.resume=true"])
    assert resumed.returncode == 0, resumed.stderr
    assert same(weights(run), weights(tmp_path / "straight"))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4]


def test_two_processes_train_as_one_accumulating_two(tiny_model_dir, kto_file, tmp_path):
    """The opponents, like the samples, are drawn with the seed of their place in the global batch."""
    options = nash_options(**RESUMABLE)
    one = cli(
        tiny_overrides(tiny_model_dir, kto_file, tmp_path / "one", **options, **{"train.grad_accum": 2})
    )
    assert one.returncode == 0, one.stderr
    two = cli(tiny_overrides(tiny_model_dir, kto_file, tmp_path / "two", **options), launcher=torchrun(2))
    assert two.returncode == 0, two.stderr
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    metrics = [
        [json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
        for r in ("one", "two")
    ]
    for m1, m2 in zip(*metrics, strict=True):
        assert m1["score"] == pytest.approx(m2["score"], abs=1e-6)
        assert m1["opponent_length"] == m2["opponent_length"]
        assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4) and m1["grad_norm"] > 0


def test_the_vader_recipe_runs_in_miniature(tiny_model_dir, tmp_path):
    """The shipped recipe on the tiny model, paid by a verifier instead of the preference model it names."""
    overrides = miniature(
        "nash_md_smollm2_vader",
        tiny_model_dir,
        tmp_path / "run",
        **{"online.preference": "verifier:tests.test_nash:shortness"},
    )
    config = load_config("nash_md_smollm2_vader", overrides)
    assert (config.loss["mixture"], config.loss["beta"]) == (0.5, 0.05)
    make_trainer(config).train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2] and all(0 <= line["score"] <= 1 for line in lines)
    evals = [json.loads(x) for x in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2]
