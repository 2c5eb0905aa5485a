"""GPO: the attention mask (a target sees the context and itself, no other target), no positional encodings
(the context's order does not matter), meta-training on a task whose answer is known, the reward source,
save and load, the embedder on the tiny model, the command end to end, and bad input.

The synthetic task: 200 random items in 8 dimensions; each group rates an item by where its projection on the
group's own random direction falls among the items' (five quantile levels). Nothing but the context tells
a held-out group's direction, so one model pooled over groups is at chance and GPO must read the context."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from transformers import LlamaForCausalLM

from prospect.config import ModelConfig, OnlineConfig
from prospect.data.row import Row
from prospect.data.tokenize import EncodedPrompt
from prospect.errors import UserError
from prospect.evaluation.judges import AIJudgeOptions, check_judges, load_judge
from prospect.models.gpo import (
    CompletionEmbedder,
    GPOConfig,
    GPOModule,
    GPOReward,
    attention_mask,
    load_gpo,
    rated_completion,
    read_context,
    save_gpo,
)
from prospect.models.loading import load_model
from prospect.online.gpo import (
    GPOEvalConfig,
    GPOTrainConfig,
    add_gpo_parser,
    evaluate,
    gpo_command,
    meta_train,
)
from prospect.online.gpo_data import (
    EmbeddedGroup,
    alignment_scores,
    group_file,
    pairwise_accuracy,
    read_groups,
    sample_episode,
    split_groups,
)
from prospect.rewards import load_reward
from tests.helpers import BAD, GOOD, TOPICS, write_jsonl

DIM, ITEMS, LEVELS = 8, 200, [1.0, 2.0, 3.0, 4.0, 5.0]
PROMPT = "Pick an item."


def small_module(dim: int = DIM, seed: int = 0, **shape) -> GPOModule:
    torch.manual_seed(seed)
    sizes = {"width": 64, "layers": 2, "heads": 4, "feedforward": 128, "max_context": 32, **shape}
    return GPOModule(GPOConfig(dim, LEVELS, **sizes)).eval()


def synthetic_groups(
    count: int, seed: int = 0
) -> tuple[torch.Tensor, list[EmbeddedGroup], list[torch.Tensor]]:
    """(items [200, 8], groups, each group's true scores of the items)."""
    generator = torch.Generator().manual_seed(seed)
    items = torch.randn(ITEMS, DIM, generator=generator)
    groups, scores = [], []
    for g in range(count):
        score = items @ torch.randn(DIM, generator=generator)
        level = torch.bucketize(score, torch.quantile(score, torch.tensor([0.2, 0.4, 0.6, 0.8])))
        groups.append(EmbeddedGroup(f"group-{g}", items, torch.nn.functional.one_hot(level, 5).float()))
        scores.append(score)
    return items, groups, scores


@pytest.fixture(scope="module")
def trained():
    """A module meta-trained on 80 synthetic groups (16 held out), with its held-out loss readings."""
    items, groups, scores = synthetic_groups(96)
    options = GPOTrainConfig(
        steps=600, groups_per_step=16, max_context=32, targets=16, learning_rate=1e-3, eval_every=300
    )
    module = small_module()
    module.standardise_with(items)
    readings = meta_train(module, groups[:80], groups[80:], options)
    return module, items, groups, scores, readings


def test_attention_mask_lets_targets_see_the_context_and_themselves_only():
    allowed = ~attention_mask(2, 3)
    assert allowed.tolist() == [
        [True, True, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, False, True, False],
        [True, True, False, False, True],
    ]


def test_a_target_depends_on_the_context_and_itself_not_on_other_targets():
    module = small_module()
    generator = torch.Generator().manual_seed(1)
    cx, tx = torch.randn(1, 6, DIM, generator=generator), torch.randn(1, 4, DIM, generator=generator)
    cy = torch.nn.functional.one_hot(torch.randint(5, (1, 6), generator=generator), 5).float()
    with torch.no_grad():
        base = module(cx, cy, tx)[0, 0]
        other = tx.clone()
        other[0, 1:] += 3.0  # every other target moved
        assert torch.allclose(module(cx, cy, other)[0, 0], base, atol=1e-6)
        moved_context = cx.clone()
        moved_context[0, 2] += 3.0
        assert (module(moved_context, cy, tx)[0, 0] - base).abs().max() > 1e-3
        relabelled = cy.roll(1, -1)
        assert (module(cx, relabelled, tx)[0, 0] - base).abs().max() > 1e-3
        itself = tx.clone()
        itself[0, 0] += 3.0
        assert (module(cx, cy, itself)[0, 0] - base).abs().max() > 1e-3
        alone = module(cx, cy, tx[:, :1])[0, 0]  # scored alone or among others: the same
        assert torch.allclose(alone, base, atol=1e-5)


def test_the_context_order_does_not_matter():
    module = small_module()
    generator = torch.Generator().manual_seed(2)
    cx, tx = torch.randn(2, 9, DIM, generator=generator), torch.randn(2, 5, DIM, generator=generator)
    cy = torch.softmax(torch.randn(2, 9, 5, generator=generator), -1)
    order = torch.randperm(9, generator=generator)
    with torch.no_grad():
        assert torch.allclose(module(cx, cy, tx), module(cx[:, order], cy[:, order], tx), atol=1e-5)
        targets = torch.tensor([3, 1, 4, 0, 2])
        assert torch.allclose(module(cx, cy, tx)[:, targets], module(cx, cy, tx[:, targets]), atol=1e-5)


def test_meta_training_lowers_the_held_out_loss(trained):
    _, _, _, _, readings = trained
    assert [r["step"] for r in readings] == [0, 300, 600]
    # Uniform over 5 levels is log 5 = 1.61; the probes include m = 1 and 4, where little can be known.
    assert readings[-1]["heldout_loss"] < min(readings[0]["heldout_loss"], math.log(5)) - 0.15


def test_held_out_groups_are_learned_from_their_context_and_better_with_more(trained):
    module, _, groups, _, _ = trained
    result = evaluate(
        module, groups[:80], groups[80:], GPOEvalConfig(contexts="1,4,16", targets=16, resamples=3)
    )
    gpo, pooled = result["methods"]["gpo"], result["methods"]["pooled"]
    accuracy = {m: gpo[str(m)]["accuracy"][0] for m in (1, 4, 16)}
    assert accuracy[16] > 0.75 > 0.6 > pooled["16"]["accuracy"][0]  # pooled: one model for opposed groups
    assert accuracy[1] + 0.1 < accuracy[4] + 0.05 < accuracy[16]
    assert gpo["16"]["alignment"][0] > result["methods"]["context_mean"]["16"]["alignment"][0]
    assert result["methods"]["context_mean"]["16"]["accuracy"][0] == 0.5  # one prediction for all: ties
    assert 0 < gpo["16"]["accuracy"][1] < 0.1  # a standard error over the 16 groups


def test_the_reward_source_prefers_what_the_context_group_prefers(trained, tmp_path):
    module, items, groups, scores, _ = trained
    group, truth = groups[85], scores[85]
    levels = [LEVELS[int(i)] for i in group.y.argmax(-1)]
    rows = [{"prompt": PROMPT, "completion": f"item-{i}", "rating": levels[i]} for i in range(24)]
    context = read_context(str(write_jsonl(tmp_path / "context.jsonl", rows)), LEVELS)

    def embed(prompts, completions):
        return items[[int(c.removeprefix("item-")) for c in completions]]

    reward = GPOReward(module, embed, context)
    others = [f"item-{i}" for i in range(24, 200)]
    values = reward([PROMPT] * len(others), others)
    assert len(values) == len(others) and all(isinstance(v, float) for v in values)
    assert pairwise_accuracy(torch.tensor(values), truth[24:]) > 0.75
    best, worst = (
        max(range(len(values)), key=values.__getitem__),
        min(range(len(values)), key=values.__getitem__),
    )
    assert truth[24 + best] > truth[24 + worst]
    assert reward([PROMPT], ["item-30"], fields=[{}]) == pytest.approx(values[6:7], abs=1e-5)


def test_save_and_load_give_the_same_module(tmp_path):
    module = small_module(seed=3)
    module.standardise_with(torch.randn(50, DIM) * 3 + 1)
    save_gpo(module, tmp_path / "run")
    loaded = load_gpo(tmp_path / "run")
    assert loaded.config == module.config
    cx, cy, tx = torch.randn(1, 5, DIM), torch.softmax(torch.randn(1, 5, 5), -1), torch.randn(1, 3, DIM)
    with torch.no_grad():
        assert torch.equal(loaded(cx, cy, tx), module(cx, cy, tx))
    with pytest.raises(UserError, match="no GPO module"):
        load_gpo(tmp_path / "nothing")
    context = write_jsonl(tmp_path / "context.jsonl", [{"prompt": "p", "completion": "c", "rating": 2}])
    with pytest.raises(UserError, match="names no embedder"):  # a reward source needs to know its LLM
        GPOReward.check(f"gpo:{tmp_path / 'run'}:{context}")
    save_gpo(small_module(dim=4), tmp_path / "other")
    (tmp_path / "run" / "model.safetensors").replace(tmp_path / "other" / "model.safetensors")
    with pytest.raises(UserError, match=r"does not match config\.json"):
        load_gpo(tmp_path / "other")


def test_measures_on_hand_computed_cases():
    levels = torch.tensor(LEVELS)
    one_hot = torch.eye(5)
    assert alignment_scores(one_hot[0], one_hot[4], levels) == pytest.approx(0.0)
    assert alignment_scores(one_hot[1], one_hot[2], levels) == pytest.approx(0.75)
    assert alignment_scores(torch.full((5,), 0.2), torch.full((5,), 0.2), levels) == pytest.approx(1.0)
    assert pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])) == pytest.approx(
        2 / 3
    )
    assert pairwise_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0])) == 0.5
    assert pairwise_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([2.0, 2.0])) is None


def test_the_embedder_is_the_mean_last_hidden_state_of_the_completion_and_is_cached(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("PROSPECT_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_model(ModelConfig(name=str(tiny_model_dir)))
    embedder = CompletionEmbedder(model.eval(), tokenizer, bf16=False, batch_size=2)
    prompts = [[{"role": "user", "content": f"Review {t}."}] for t in (TOPICS[0], TOPICS[1], TOPICS[0])]
    completions = ["It was a dull mess.", "It was lovely and warm.", "It was a dull mess."]
    vectors = embedder(prompts, completions)
    assert vectors.shape == (3, 32) and embedder.computed == 2  # the repeated text once
    plain = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    item = embedder.encoder.encode(prompts[1], [{"role": "assistant", "content": completions[1]}], None, "")
    with torch.no_grad():
        states = plain(torch.tensor([item.prompt_ids + item.completion_ids]), output_hidden_states=True)
    expected = states.hidden_states[-1][0, len(item.prompt_ids) :].mean(0)
    assert torch.allclose(vectors[1], expected, atol=1e-5)
    assert torch.equal(vectors[0], vectors[2])
    again = CompletionEmbedder(model, tokenizer, bf16=False)
    assert torch.equal(again(prompts, completions), vectors) and again.computed == 0  # read from disk
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 1


def group_rows(groups: int = 12, per_group: int = 24) -> list[dict]:
    """Rated reviews: even groups like the good ones, odd groups the bad ones (ratings 1 to 3)."""
    rows = []
    for g in range(groups):
        for i in range(per_group):
            good = i % 2 == 0
            text = f"It was {(GOOD if good else BAD)[(i // 2) % 4]}."
            liked = good == (g % 2 == 0)
            rating = 3 if liked else 1 + (i % 3 == 0)
            rows.append(
                {"group": f"g{g}", "prompt": f"Review {TOPICS[i % 6]}.", "completion": text, "rating": rating}
            )
    return rows


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_gpo_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_the_command_trains_evaluates_and_gives_a_reward_source(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PROSPECT_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "groups.jsonl", group_rows())
    run = tmp_path / "run"
    train = ["gpo", "train", "--data", str(data), "--model", str(tiny_model_dir), "-o", str(run)]
    small = ["--steps", "30", "--max-context", "8", "--targets", "8", "--heldout-percent", "40"]
    shape = ["--width", "32", "--heads", "2", "--layers", "1", "--feedforward", "32", "--precision", "fp32"]
    gpo_command(parse(train + small + shape))
    record = json.loads((run / "training.json").read_text())
    assert record["levels"] == [1.0, 2.0, 3.0]
    assert not set(record["train_groups"]) & set(record["heldout_groups"])
    assert len(record["train_groups"] + record["heldout_groups"]) == 12
    readings = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert readings[0]["step"] == 0 and readings[-1]["step"] == 30
    with pytest.raises(UserError, match="holds a GPO run; pass --overwrite"):
        gpo_command(parse(train + small + shape))

    gpo_command(
        parse(["gpo", "evaluate", str(run), "--contexts", "1,4", "--targets", "8", "--resamples", "2"])
    )
    result = json.loads((run / "evaluation.json").read_text())
    assert set(result["methods"]) == {"gpo", "pooled", "per_group", "context_mean"}
    assert result["contexts"] == [1, 4] and result["heldout_groups"] == len(record["heldout_groups"])
    assert "alignment" in capsys.readouterr().out

    reward = GPOReward.from_spec(f"gpo:{run}:{run / 'example_context.jsonl'}")
    values = reward(["Review the cartoon."] * 2, ["It was lovely and warm.", "It was a dull mess."])
    assert len(values) == 2 and all(1.0 <= v <= 3.0 for v in values)
    # By name, as every reward source and judge: online.reward_model and --judges / online.preference.
    name = f"gpo:{run}:{run / 'example_context.jsonl'}"
    by_name = load_reward(OnlineConfig(reward_model=name), torch.device("cpu"), False)
    assert by_name(["Review the cartoon."] * 2, ["It was lovely and warm.", "It was a dull mess."]) == values
    judge = load_judge(name, AIJudgeOptions(), torch.device("cpu"), False)
    items = [EncodedPrompt([], "Review the cartoon.", "x")]
    pair = [("It was lovely and warm.", "It was a dull mess.")]
    (preference,) = judge.prefer(["Review the cartoon."], pair, items)
    assert preference == pytest.approx(1 / (1 + math.exp(-(values[0] - values[1]))))
    with pytest.raises(UserError, match=r"missing: no GPO module \(config.json and model.safetensors\)"):
        check_judges(
            f"gpo:{tmp_path / 'missing'}:{run / 'example_context.jsonl'}",
            AIJudgeOptions(),
            "online.preference",
        )

    config = json.loads((run / "config.json").read_text())
    config["embedder"]["fingerprint"] = "0" * 16
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trained on embeddings of another"):
        GPOReward.from_spec(f"gpo:{run}:{run / 'example_context.jsonl'}")


def test_bad_input_ends_with_one_line_naming_where(tmp_path):
    def row(**values) -> Row:
        return Row("ctx.jsonl:3", {"prompt": "p", "completion": "c", **values})

    with pytest.raises(UserError, match=r"ctx.jsonl:3: expected exactly one of fields 'rating'"):
        rated_completion(row(), LEVELS)
    with pytest.raises(
        UserError, match=r"ctx.jsonl:3: field 'rating': expected one of the levels 1, 2, 3, 4, 5, got 2.5"
    ):
        rated_completion(row(rating=2.5), LEVELS)
    with pytest.raises(UserError, match=r"ctx.jsonl:3: field 'rating': expected a finite number"):
        rated_completion(row(rating="high"), LEVELS)
    with pytest.raises(UserError, match=r"ctx.jsonl:3: field 'ratings': expected a non-empty list"):
        rated_completion(row(ratings=[]), LEVELS)
    with pytest.raises(UserError, match=r"ctx.jsonl:3: field 'completion'"):
        rated_completion(Row("ctx.jsonl:3", {"prompt": "p", "rating": 1}), LEVELS)
    assert rated_completion(row(ratings=[1, 1, 5, 2]), LEVELS).distribution == [0.5, 0.25, 0, 0, 0.25]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "completion": "c", "rating": 9}])
    with pytest.raises(UserError, match=r"bad.jsonl:1: field 'rating': expected one of the levels"):
        read_context(str(bad), LEVELS)
    with pytest.raises(UserError, match="no such file"):
        read_context(str(tmp_path / "missing.jsonl"), LEVELS)
    with pytest.raises(UserError, match="expected gpo:RUN_DIR:CONTEXT_FILE"):
        GPOReward.from_spec("gpo:runs-only")

    nameless = write_jsonl(
        tmp_path / "nameless.jsonl", [{"prompt": "p", "completion": "c", "rating": r} for r in (1, 2)]
    )
    with pytest.raises(UserError, match=r"nameless.jsonl:1: field 'group': expected the group's name"):
        group_file(str(nameless), None)
    scores = write_jsonl(
        tmp_path / "scores.jsonl",
        [{"group": "a", "prompt": "p", "completion": "c", "rating": i / 7} for i in range(30)],
    )
    with pytest.raises(UserError, match="30 distinct ratings; expected a rating scale of at most 21"):
        group_file(str(scores), None)
    assert group_file(str(scores), [i / 7 for i in range(30)]).levels[-1] == pytest.approx(29 / 7)
    few = write_jsonl(tmp_path / "few.jsonl", group_rows(groups=3, per_group=10))
    with pytest.raises(
        UserError, match=r"0 of 3 groups have at least 96 examples \(max_context \+ targets\)"
    ):
        read_groups(str(few), "", 96)
    with pytest.raises(UserError, match="levels: expected comma-separated numbers"):
        read_groups(str(few), "1,two", 4)
    with pytest.raises(UserError, match="expected some of each"):
        split_groups(group_file(str(few), None).groups[:1], 25)

    with pytest.raises(UserError, match=r"gpo\.min_context: expected at most max_context"):
        gpo_command(
            parse(["gpo", "train", "--min-context", "9", "--max-context", "8", "-o", str(tmp_path / "r")])
        )
    with pytest.raises(UserError, match=r"prospect gpo train.steps: expected a whole number >= 1"):
        gpo_command(parse(["gpo", "train", "--steps", "0", "-o", str(tmp_path / "r")]))
    with pytest.raises(UserError, match=r"no training\.json"):
        gpo_command(parse(["gpo", "evaluate", str(tmp_path)]))


def test_episodes_draw_disjoint_context_and_targets():
    _, groups, _ = synthetic_groups(2)
    ids = [EmbeddedGroup(g.name, torch.arange(ITEMS, dtype=torch.float32)[:, None], g.y) for g in groups]
    episode = sample_episode(ids, 10, 20, torch.Generator().manual_seed(0))
    for b in range(2):
        context, targets = set(episode.context_x[b, :, 0].tolist()), set(episode.target_x[b, :, 0].tolist())
        assert len(context) == 10 and len(targets) == 20 and not context & targets
