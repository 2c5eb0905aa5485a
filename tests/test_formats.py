"""Data as users have it: files written by `datasets` itself, TRL's and HALOs' formats, held-out data that is
really held out, and errors that blame the right thing."""

from __future__ import annotations

import dataclasses
import json
import logging

import datasets
import pytest

from prospect.config import DataConfig
from prospect.data.convert import prompt_key
from prospect.data.pipeline import load_eval_prompts, read_heldout_parsed, read_prompts, read_training
from prospect.data.splits import HELD_OUT
from prospect.data.tokenize import Encoder
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.online.session import nested_run
from prospect.recipe import load_config
from tests.helpers import tiny_overrides, write_jsonl


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """load_dataset caches what it reads; keep that out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def feedback(n: int, conversational: bool = False) -> list[dict]:
    """n rows with n distinct prompts, alternately desirable."""
    rows = []
    for i in range(n):
        prompt, completion = f"Review film {i}.", f"It was {'good' if i % 2 else 'bad'} {i}."
        if conversational:
            user, assistant = (
                [{"role": "user", "content": prompt}],
                [{"role": "assistant", "content": completion}],
            )
            rows.append({"prompt": user, "completion": assistant, "label": i % 2 == 1})
        else:
            rows.append({"prompt": prompt, "completion": completion, "label": i % 2 == 1})
    return rows


def key(item) -> str:
    return prompt_key(item.prompt)


# -- held-out means held out ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["json lines", "saved without splits"])
def test_evaluation_prompts_of_one_source_are_never_trained_on(layout, tiny_model_dir, tmp_path, caplog):
    table = datasets.Dataset.from_list(feedback(120))
    data = tmp_path / "feedback.jsonl"
    if layout == "json lines":
        table.to_json(str(data))
    else:
        data = tmp_path / "saved"
        table.save_to_disk(str(data))
    overrides = tiny_overrides(tiny_model_dir, data, tmp_path / "run", **{"eval.num_prompts": 100})
    with caplog.at_level(logging.INFO, logger="prospect"):
        trainer = Trainer(load_config(None, overrides))
        held_out = load_eval_prompts(trainer.cfg.data, trainer.encoder, 100)
    trained = {item.location for item in trainer.data.items}
    evaluated = {item.location for item in held_out}
    assert 0 < len(evaluated) < 30 and len(trained) + len(evaluated) == 120
    assert not trained & evaluated
    assert f"{len(evaluated)} of 120 rows set aside for evaluation" in caplog.text
    assert f"evaluation data: {len(evaluated)} rows from the held-out share of {data}" in caplog.text


def test_the_held_out_share_is_fixed_by_the_prompt(tmp_path):
    """Reordered rows, another seed, several rows of one prompt: the same prompts are held out."""
    rows = feedback(60) + [dict(r, completion="Another take.") for r in feedback(60)]
    first = write_jsonl(tmp_path / "a.jsonl", rows)
    second = write_jsonl(tmp_path / "b.jsonl", rows[::-1])
    held = [{key(e) for e in read_heldout_parsed(DataConfig(train=str(p)))[1]} for p in (first, second)]
    trained, reordered = (
        {key(e) for e in read_training(DataConfig(train=str(p)), "unpaired", seed, evaluating=True)}
        for p, seed in ((first, 7), (second, 3))
    )
    assert trained == reordered
    assert held[0] == held[1] and held[0] and not held[0] & trained
    assert len(trained) + len(held[0]) == 60
    everything = read_training(DataConfig(train=str(first)), "unpaired", 7)  # not evaluating: all rows train
    assert len(everything) == 120


def test_data_with_splits_evaluates_on_its_split_or_on_a_held_out_share(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(feedback(40))})
    splits.save_to_disk(str(tmp_path / "only-train"))
    cfg = DataConfig(train=str(tmp_path / "only-train"))
    with pytest.raises(
        UserError, match=r"no split 'test'; it has train; set data.eval_split to one of them or"
    ):
        read_heldout_parsed(cfg)
    cfg = DataConfig(train=str(tmp_path / "only-train"), eval_split=HELD_OUT)
    held = {key(e) for e in read_heldout_parsed(cfg)[1]}
    trained = {key(e) for e in read_training(cfg, "unpaired", 0, evaluating=True)}
    assert held and not held & trained and len(held) + len(trained) == 40


def test_separate_held_out_data_is_used_whole_and_training_keeps_every_row(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", feedback(40))
    held = write_jsonl(tmp_path / "held.jsonl", feedback(8))
    cfg = DataConfig(train=str(train), eval=str(held))
    assert len(read_heldout_parsed(cfg)[1]) == 8
    assert len(read_training(cfg, "unpaired", 0, evaluating=True)) == 40


def test_online_loops_sample_and_evaluate_on_disjoint_prompts(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "prompts.jsonl", feedback(80))
    config = load_config(
        None, tiny_overrides(tiny_model_dir, data, tmp_path / "run", **{"eval.num_prompts": 8})
    )
    sampled = {key(e) for e in read_prompts(config.data, 0, evaluating=True)}
    inner = nested_run(config, write_jsonl(tmp_path / "samples.jsonl", feedback(4)), tmp_path / "inner")
    assert (inner.data.eval, inner.data.eval_split) == (str(data), HELD_OUT)
    evaluated = {key(e) for e in read_heldout_parsed(inner.data)[1]}
    assert evaluated and not evaluated & sampled and len(evaluated) + len(sampled) == 80


def test_online_runs_evaluate_on_the_outer_runs_split_and_subset(tmp_path):
    """A loop's nested runs train on a samples file and evaluate where the outer run does: the held-out share
    of a split not named 'train', or a subset of a hub folder."""
    named = tmp_path / "named"
    datasets.DatasetDict({"training": datasets.Dataset.from_list(feedback(60))}).save_to_disk(str(named))
    outer = DataConfig(train=str(named), train_split="training", eval_split=HELD_OUT)
    samples = write_jsonl(tmp_path / "samples.jsonl", feedback(4))
    inner = load_config(None, [f"data.train={samples}"])
    inner_data = nested_run(dataclasses.replace(inner, data=outer), samples, tmp_path / "inner").data
    assert {key(e) for e in read_heldout_parsed(inner_data)[1]} == {
        key(e) for e in read_heldout_parsed(outer)[1]
    }
    assert len(read_training(inner_data, "unpaired", 0, evaluating=True)) == 4
    root = hub_folder(tmp_path / "repo", {"small": 4, "large": 10})
    outer = DataConfig(train=str(root), subset="large")
    inner_data = nested_run(dataclasses.replace(inner, data=outer), samples, tmp_path / "inner").data
    assert len(read_heldout_parsed(inner_data)[1]) == 2  # the test split of 'large'
    assert len(read_training(inner_data, "unpaired", 0, evaluating=True)) == 4
    separate = DataConfig(train=str(root), subset="large", eval=str(samples))  # a file has no subsets
    assert len(read_heldout_parsed(separate)[1]) == 4


def test_a_run_reads_its_data_file_once_and_again_when_it_changes(tiny_model_dir, tmp_path, monkeypatch):
    from prospect.data import sources

    data = write_jsonl(tmp_path / "feedback.jsonl", feedback(60))
    reads = []
    real_read = sources.read_file
    monkeypatch.setattr(sources, "read_file", lambda path: reads.append(path) or real_read(path))
    overrides = tiny_overrides(tiny_model_dir, data, tmp_path / "run", **{"eval.num_prompts": 4})
    trainer = Trainer(load_config(None, overrides))  # training rows, held-out loss rows
    load_eval_prompts(trainer.cfg.data, trainer.encoder, 4)
    assert reads == [data]
    write_jsonl(data, feedback(70))
    assert len(read_training(DataConfig(train=str(data)), "unpaired", 0)) == 70 and reads == [data, data]


# -- files as `datasets` writes them -------------------------------------------------------------------


def test_csv_written_by_datasets_reads_conversations_as_messages(tmp_path):
    rows = feedback(6, conversational=True)
    rows[0]["prompt"][0]["content"] = 'He said "it\'s [{fine}]",\nthen left.'
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    assert "[{'role': 'user'" in (tmp_path / "d.csv").read_text()  # Python reprs, not JSON
    examples = read_training(DataConfig(train=str(tmp_path / "d.csv")), "unpaired", 0)
    assert sorted(json.dumps(e.prompt) for e in examples) == sorted(json.dumps(r["prompt"]) for r in rows)
    assert {json.dumps(e.completion) for e in examples} == {json.dumps(r["completion"]) for r in rows}


def test_a_broken_conversation_in_csv_is_refused_with_its_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,completion,label\nhi,ok,True\n\"[{'role': 'user', 'content': 'x'\",ok,False\n")
    with pytest.raises(UserError, match=r"d\.csv:3: field 'prompt': expected a list written as JSON or as a"):
        read_training(DataConfig(train=str(path)), "unpaired", 0)


def test_json_lines_in_a_json_file_as_datasets_writes_it(tmp_path):
    datasets.Dataset.from_list(feedback(5)).to_json(str(tmp_path / "d.json"))
    examples = read_training(DataConfig(train=str(tmp_path / "d.json")), "unpaired", 0)
    assert [e.location for e in examples] == [f"{tmp_path / 'd.json'}:{i}" for i in range(1, 6)]


def hub_folder(root, subsets: dict[str, int]):
    """A folder as a hub dataset repo holds it: parquet files per config and split, a README naming them."""
    configs = []
    for name, n in subsets.items():
        (root / name).mkdir(parents=True)
        datasets.Dataset.from_list(feedback(n)).to_parquet(str(root / name / "train-00000-of-00001.parquet"))
        datasets.Dataset.from_list(feedback(2)).to_parquet(str(root / name / "test-00000-of-00001.parquet"))
        configs.append(
            f"- config_name: {name}\n  data_files:\n  - split: train\n    path: {name}/train-*\n"
            f"  - split: test\n    path: {name}/test-*\n"
        )
    (root / "README.md").write_text("---\nconfigs:\n" + "".join(configs) + "---\n")
    return root


def test_a_folder_in_the_hub_layout_and_its_subsets(tmp_path):
    plain = tmp_path / "plain"
    (plain / "data").mkdir(parents=True)
    datasets.Dataset.from_list(feedback(6)).to_parquet(str(plain / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(feedback(3)).to_parquet(str(plain / "data" / "test-00000-of-00001.parquet"))
    assert len(read_training(DataConfig(train=str(plain)), "unpaired", 0)) == 6
    assert len(read_heldout_parsed(DataConfig(train=str(plain)))[1]) == 3  # its test split
    root = hub_folder(tmp_path / "repo", {"small": 4, "large": 10})
    assert len(read_training(DataConfig(train=str(root), subset="large"), "unpaired", 0)) == 10
    assert len(read_training(DataConfig(train=str(root), subset="small"), "unpaired", 0)) == 4
    with pytest.raises(UserError, match=r"repo: is a directory but .*'nope' not found"):
        read_training(DataConfig(train=str(root), subset="nope"), "unpaired", 0)


def test_a_mixture_of_sources_with_weights(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", feedback(30))
    b = tmp_path / "b.parquet"
    datasets.Dataset.from_list(
        [dict(r, prompt=f"Other {i}.") for i, r in enumerate(feedback(10))]
    ).to_parquet(str(b))
    both = read_training(DataConfig(train=f"{a}, {b}"), "unpaired", 0)
    assert len(both) == 40
    weighted = read_training(DataConfig(train=f"{a}:3, {b}:1"), "unpaired", 0)
    from_b = [e for e in weighted if e.prompt.startswith("Other")]
    assert (len(weighted), len(from_b)) == (40, 10)  # b's 10 rows are a quarter; a gives its first 30
    weighted = read_training(DataConfig(train=f"{a}:1, {b}:1"), "unpaired", 0)
    assert len(weighted) == 20 and sum(e.prompt.startswith("Other") for e in weighted) == 10
    with pytest.raises(UserError, match=r"give every source a weight, or none"):
        read_training(DataConfig(train=f"{a}:1, {b}"), "unpaired", 0)


# -- labels --------------------------------------------------------------------------------------------


def test_labels_as_integers_and_as_class_labels(tmp_path):
    rows = [dict(r, label=int(r["label"])) for r in feedback(6)]
    expected = {r["prompt"]: bool(r["label"]) for r in rows}
    table = datasets.Dataset.from_list(rows)
    table.to_json(str(tmp_path / "ints.jsonl"))
    table.to_csv(str(tmp_path / "ints.csv"))
    names = datasets.ClassLabel(names=["good", "bad"])  # index 0 is desirable: read by name, not by order
    named = table.map(lambda r: {"label": 0 if r["label"] else 1}).cast_column("label", names)
    named.save_to_disk(str(tmp_path / "named"))
    named.to_parquet(str(tmp_path / "named.parquet"))
    table.class_encode_column("label").save_to_disk(str(tmp_path / "encoded"))
    for source in ("ints.jsonl", "ints.csv", "named", "named.parquet", "encoded"):
        examples = read_training(DataConfig(train=str(tmp_path / source)), "unpaired", 0)
        assert {e.prompt: e.label for e in examples} == expected, source
    odd = table.cast_column("label", datasets.ClassLabel(names=["cat", "dog"]))
    odd.save_to_disk(str(tmp_path / "odd"))
    with pytest.raises(UserError, match=r"field 'label': expected class names that read as desirable or not"):
        read_training(DataConfig(train=str(tmp_path / "odd")), "unpaired", 0)
    write_jsonl(tmp_path / "two.jsonl", [dict(rows[0], label=2)])
    with pytest.raises(
        UserError, match=r"two\.jsonl:1: field 'label': expected a boolean \(true or false\) or 0/1"
    ):
        read_training(DataConfig(train=str(tmp_path / "two.jsonl")), "unpaired", 0)


# -- TRL's language-modelling formats for SFT ----------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Review the cartoon."},
    {"role": "assistant", "content": "It was lovely and warm."},
    {"role": "user", "content": "And the thriller?"},
    {"role": "assistant", "content": "It was a dull mess."},
]


def test_messages_train_on_assistant_turns_only_or_on_every_token(tiny_tokenizer, tmp_path):
    datasets.Dataset.from_list([{"messages": CONVERSATION}]).to_json(str(tmp_path / "chat.jsonl"))
    encoder = Encoder(tiny_tokenizer, 200, 100)
    whole = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    whole_ids = encoder.ids(whole)
    turns = read_training(DataConfig(train=str(tmp_path / "chat.jsonl")), "completions", 0)
    assert [t.prompt for t in turns] == [CONVERSATION[:2], CONVERSATION[:4]]
    trained = []
    for turn in turns:
        item = encoder.encode(turn.prompt, turn.completion, None, turn.location)
        assert (
            whole_ids[: len(item.prompt_ids) + len(item.completion_ids)]
            == item.prompt_ids + item.completion_ids
        )
        trained.append(tiny_tokenizer.decode(item.completion_ids))
    assert trained == ["It was lovely and warm.<|im_end|>\n", "It was a dull mess.<|im_end|>\n"]
    cfg = DataConfig(train=str(tmp_path / "chat.jsonl"), assistant_only_loss=False)
    (everything,) = read_training(cfg, "completions", 0)
    item = encoder.encode(everything.prompt, everything.completion, None, everything.location)
    assert item.prompt_ids + item.completion_ids == whole_ids and len(item.prompt_ids) == 1
    assert read_prompts(DataConfig(train=str(tmp_path / "chat.jsonl")), 0)[0].prompt == CONVERSATION[:4]


def test_text_rows_train_on_every_token_with_eos(tiny_tokenizer, tmp_path):
    datasets.Dataset.from_list([{"text": "Review the cartoon. It was lovely."}]).to_parquet(
        str(tmp_path / "t.parquet")
    )
    (example,) = read_training(DataConfig(train=str(tmp_path / "t.parquet")), "completions", 0)
    item = Encoder(tiny_tokenizer, 200, 100).encode(
        example.prompt, example.completion, None, example.location
    )
    expected = [
        *tiny_tokenizer("Review the cartoon. It was lovely.")["input_ids"],
        tiny_tokenizer.eos_token_id,
    ]
    assert item.prompt_ids + item.completion_ids == expected and len(item.prompt_ids) == 1
    with pytest.raises(UserError, match=r"text rows have no prompts to sample from"):
        read_prompts(DataConfig(train=str(tmp_path / "t.parquet")), 0)


def test_sft_runs_on_messages_and_on_text(tiny_model_dir, tmp_path):
    rows = [{"messages": CONVERSATION}] * 4 + [{"messages": CONVERSATION[1:3]}] * 4
    write_jsonl(tmp_path / "chat.jsonl", rows)
    write_jsonl(tmp_path / "text.jsonl", [{"text": f"It was good {i}."} for i in range(8)])
    for data in ("chat.jsonl", "text.jsonl"):
        options = {"loss.name": "sft", "train.max_steps": 2, "train.padding_free": data == "text.jsonl"}
        trainer = Trainer(
            load_config(
                None, tiny_overrides(tiny_model_dir, tmp_path / data, tmp_path / f"run-{data}", **options)
            )
        )
        assert len(trainer.data.items) == (12 if data == "chat.jsonl" else 8)
        assert (trainer.train() / "model.safetensors").is_file()


# -- preference pairs: implicit prompts, HALOs' feedback, unpaired data --------------------------------


def test_text_pairs_with_an_implicit_prompt_split_as_trl_does(tmp_path):
    from trl.data_utils import extract_prompt

    pairs = [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {
            "chosen": "\n\nHuman: Hi?\n\nAssistant: Hello there.",
            "rejected": "\n\nHuman: Hi?\n\nAssistant: Go.",
        },
        {"chosen": "The cat", "rejected": "The car"},
    ]
    datasets.Dataset.from_list(pairs).to_json(str(tmp_path / "pairs.json"))
    parsed = read_training(DataConfig(train=str(tmp_path / "pairs.json")), "paired", 0)
    ours = sorted((p.prompt, p.chosen, p.rejected) for p in parsed)
    assert ours == sorted(tuple(extract_prompt(p).values()) for p in pairs)
    write_jsonl(tmp_path / "bad.jsonl", [*pairs, {"chosen": "Yes.", "rejected": "No."}])
    with pytest.raises(
        UserError, match=r"bad\.jsonl:4: field 'prompt': expected a value, or chosen and rejected"
    ):
        read_training(DataConfig(train=str(tmp_path / "bad.jsonl")), "paired", 0)


def halos_items(feedback_type: str) -> list[dict]:
    """Rows as HALOs' label.py writes them (conversational prompts, outputs as one assistant message)."""
    items = []
    for i in range(4):
        prompt = [{"role": "user", "content": f"Review film {i}."}]
        good, bad = (
            [{"role": "assistant", "content": f"Great {i}."}],
            [{"role": "assistant", "content": f"Dull {i}."}],
        )
        common = {"prompt_id": i, "prompt": prompt, "type": feedback_type}
        if feedback_type == "binary_feedback":
            items += [
                {**common, "output": good, "label": 1, "reward": 2.0},
                {**common, "output": bad, "label": 0, "reward": -1.0},
            ]
        else:
            a, b = (good, bad) if i % 2 else (bad, good)
            items.append(
                {
                    **common,
                    "output_A": a,
                    "output_B": b,
                    "label": int(a is good),
                    "reward_A": 0,
                    "reward_B": 0,
                }
            )
    return items


def test_halos_binary_and_pairwise_feedback(tmp_path):
    (tmp_path / "binary.json").write_text(json.dumps(halos_items("binary_feedback")))
    (tmp_path / "pairwise.json").write_text(json.dumps(halos_items("pairwise_feedback")))
    examples = read_training(DataConfig(train=str(tmp_path / "binary.json")), "unpaired", 0)
    assert len(examples) == 8 and all(
        e.label == e.completion[0]["content"].startswith("Great") for e in examples
    )
    pairs = read_training(DataConfig(train=str(tmp_path / "pairwise.json")), "paired", 0)
    assert len(pairs) == 4
    assert all(
        p.chosen[0]["content"].startswith("Great") and p.rejected[0]["content"].startswith("Dull")
        for p in pairs
    )


def test_dpo_on_unpaired_data_says_the_data_is_unpaired(tmp_path):
    write_jsonl(tmp_path / "kto.jsonl", feedback(8))  # one completion per prompt
    with pytest.raises(UserError) as error:
        read_training(DataConfig(train=str(tmp_path / "kto.jsonl")), "paired", 0)
    message = str(error.value)
    assert "the rows are unpaired" in message and "use an unpaired loss (kto, csft)" in message
    assert "pair_min_gap" not in message and "rating" not in message


def test_the_open_film_prompts_differ_from_the_training_prompts():
    from prospect.data.film_prompts import ASKINGS, FILMS
    from prospect.data.sources import read_rows

    rows = read_rows("film-opinions", "test")
    texts = [r.values["prompt"][0]["content"] for r in rows]
    assert len(set(texts)) == len(texts) == len(ASKINGS) * len(FILMS) == 256
    for start in range(0, 256, 16):  # any 16 in a row: every asking and every film
        window = texts[start : start + 16]
        assert all(sum(a.split("{film}")[0] in t for t in window) >= 1 for a in ASKINGS)
        assert all(sum(f in t for t in window) == 1 for f in FILMS)
    training = {r.values["prompt"][0]["content"] for r in read_rows("vader-movies", "train")}
    assert not any(t.startswith("Write a one-sentence movie review") for t in texts) and training
    with pytest.raises(UserError, match=r"film-opinions: no split 'train'; it has test"):
        read_rows("film-opinions", "train")
