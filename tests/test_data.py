"""Every accepted input format gives the same examples; the KL batch pairs x_i with y_(i+1 mod n)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from prospect.config import DataConfig
from prospect.data.batching import microbatch_slice, pad, step_indices
from prospect.data.convert import to_pairs, to_unpaired, unpair
from prospect.data.formats import parse_rows
from prospect.data.pipeline import read_training
from prospect.data.shapes import make_batch
from prospect.data.sources import read_rows
from prospect.data.tokenize import Encoded, Encoder
from prospect.errors import UserError
from prospect.losses.kto import MismatchedPairsKL
from tests.helpers import paired_rows, unpaired_rows, write_jsonl


def write_all_formats(tmp_path, rows):
    import datasets

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows)}
    (tmp_path / "d.json").write_text(json.dumps(rows))
    paths["json"] = tmp_path / "d.json"
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "d.parquet"))
    paths["parquet"] = tmp_path / "d.parquet"
    table.save_to_disk(str(tmp_path / "d_dataset"))
    paths["dataset"] = tmp_path / "d_dataset"
    if all(isinstance(v, (str, bool)) for r in rows for v in r.values()):
        with open(tmp_path / "d.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths["csv"] = tmp_path / "d.csv"
    return paths


def normalised(examples):
    return [(json.dumps(e.prompt), json.dumps(e.completion), e.label) for e in examples]


@pytest.mark.parametrize("conversational", [False, True])
def test_every_unpaired_format_reads_the_same(tmp_path, conversational):
    rows = unpaired_rows(12, conversational)
    paths = write_all_formats(tmp_path, rows)
    assert set(paths) >= {"jsonl", "json", "parquet", "dataset"}
    results = {}
    for kind, path in paths.items():
        results[kind] = normalised(read_training(DataConfig(train=str(path)), "unpaired", seed=0))
    expected = results["jsonl"]
    assert len(expected) == 12
    assert all(r == expected for r in results.values())
    assert [label for *_, label in expected] == [r["label"] for r in rows]


@pytest.mark.parametrize("conversational", [False, True])
def test_paired_rows_become_shuffled_unpaired(tmp_path, conversational):
    rows = paired_rows(20, conversational)
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    examples = read_training(DataConfig(train=str(path)), "unpaired", seed=3)
    assert len(examples) == 40
    assert sum(e.label for e in examples) == 20
    # Shuffled: the first half is not all desirable (the block order that gives one-label batches).
    assert 0 < sum(e.label for e in examples[:20]) < 20
    if conversational:  # implicit prompt: the shared opening user message
        assert examples[0].prompt == [{"role": "user", "content": examples[0].prompt[0]["content"]}]
        assert examples[0].completion[0]["role"] == "assistant"
    chosen = {json.dumps(e.completion) for e in examples if e.label}
    expected = {json.dumps(r["chosen"][-1:] if conversational else r["chosen"]) for r in rows}
    assert chosen == expected


def test_pairs_to_unpaired_keeps_each_pair():
    _, pairs = parse_rows(read_rows_from(paired_rows(4)), "paired")
    examples = unpair(pairs, "both", random.Random(0))
    for pair in pairs:
        mine = [e for e in examples if e.location == pair.location]
        assert sorted((e.completion, e.label) for e in mine) == sorted(
            [(pair.chosen, True), (pair.rejected, False)]
        )


def test_ratings_become_the_pairwise_losses_pairs_for_kto_when_asked():
    """data.ratings_for_unpaired=pairs: KTO trains on both sides of exactly the pairs DPO would get, not on
    thresholded ratings."""
    rows = [
        {"prompt": f"Review film {i // 3}.", "completion": f"Take {i}.", "rating": r}
        for i, r in enumerate([3.0, 0.0, -2.5, 2.0, 1.5, -1.0])
    ]
    kind, parsed = parse_rows(read_rows_from(rows), "rated")
    cfg = DataConfig(pair_min_gap=2.0, ratings_for_unpaired="pairs")
    pairs = to_pairs(kind, parsed, cfg, seed=0)
    examples = to_unpaired(kind, parsed, cfg, seed=0)
    expected = sorted((str(p.chosen), True) for p in pairs) + sorted((str(p.rejected), False) for p in pairs)
    got = sorted((str(e.completion), e.label) for e in examples if e.label) + sorted(
        (str(e.completion), e.label) for e in examples if not e.label
    )
    # Gaps of at least 2: (3, 0), (3, -2.5), (0, -2.5) for the first film, (2, -1), (1.5, -1) for the second.
    assert sorted((str(p.chosen), str(p.rejected)) for p in pairs) == [
        ("Take 0.", "Take 1."), ("Take 0.", "Take 2."), ("Take 1.", "Take 2."),
        ("Take 3.", "Take 5."), ("Take 4.", "Take 5."),
    ]  # fmt: skip
    assert got == expected
    thresholded = to_unpaired(kind, parsed, DataConfig(pair_min_gap=2.0), seed=0)
    assert len(thresholded) == 5  # 0.0 lies between the thresholds and is left out


def read_rows_from(rows):
    from prospect.data.sources import Row

    return [Row(f"mem: row {i}", r) for i, r in enumerate(rows, 1)]


def test_conversational_encoding_uses_the_chat_template(tiny_tokenizer):
    encoder = Encoder(tiny_tokenizer, max_length=64, max_prompt_length=32)
    prompt = [{"role": "user", "content": "Review the cartoon."}]
    item = encoder.encode(prompt, [{"role": "assistant", "content": "It was lovely and warm."}], True, "x")
    assert (
        tiny_tokenizer.decode(item.prompt_ids)
        == "<|im_start|>user\nReview the cartoon.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tiny_tokenizer.decode(item.completion_ids) == "It was lovely and warm.<|im_end|>\n"
    assert item.prompt_ids == encoder.prompt_ids(prompt)  # the same prompt tokens used for sampling


def test_plain_text_encoding_appends_eos(tiny_tokenizer):
    encoder = Encoder(tiny_tokenizer, max_length=64, max_prompt_length=32)
    item = encoder.encode("Review the cartoon.", " It was lovely.", False, "x")
    assert item.completion_ids[-1] == tiny_tokenizer.eos_token_id
    assert (
        tiny_tokenizer.decode(item.prompt_ids + item.completion_ids)
        == "Review the cartoon. It was lovely.<|im_end|>"
    )


def test_truncation_keeps_prompt_end_then_completion_start(tiny_tokenizer):
    encoder = Encoder(tiny_tokenizer, max_length=10, max_prompt_length=4)
    item = encoder.fit(Encoded(list(range(8)), list(range(100, 110)), True, "x"))
    assert item.prompt_ids == [4, 5, 6, 7] and item.completion_ids == list(range(100, 106)) and item.truncated
    strict = Encoder(tiny_tokenizer, max_length=10, max_prompt_length=4, truncation=False)
    with pytest.raises(UserError, match=r"^x: example has 18 tokens; expected at most data.max_length=10"):
        strict.fit(Encoded(list(range(8)), list(range(100, 110)), True, "x"))


def test_kl_batch_pairs_each_prompt_with_the_next_completion():
    items = [Encoded([1, 10 + i], [20 + i, 30 + i, 2][: 2 + i % 2], i % 2 == 0, f"r{i}") for i in range(3)]
    batch = make_batch(items, "unpaired", pad_id=0)
    shifted = MismatchedPairsKL().sequences(items, fit=lambda e: e)
    kl = pad([s.prompt_ids for s in shifted], [s.completion_ids for s in shifted], pad_id=0)
    for i in range(3):
        j = (i + 1) % 3
        expected = items[i].prompt_ids + items[j].completion_ids
        assert kl.input_ids[i, : len(expected)].tolist() == expected
        assert kl.completion_mask[i].nonzero().flatten().tolist() == list(
            range(2, 2 + len(items[j].completion_ids))
        )
        assert kl.attention_mask[i].sum() == len(expected)
    assert batch.labels.tolist() == [True, False, True]
    assert batch.sequences.completion_tokens == sum(len(i.completion_ids) for i in items)


def test_step_order_is_stateless_and_covers_each_epoch():
    first_epoch = [i for s in range(5) for i in step_indices(20, 4, seed=7, step=s)]
    assert sorted(first_epoch) == list(range(20))
    assert step_indices(20, 4, seed=7, step=2) == step_indices(20, 4, seed=7, step=2)
    assert step_indices(20, 4, seed=7, step=5) != step_indices(20, 4, seed=7, step=0)  # a new permutation


def test_microbatches_of_one_process_match_many_processes():
    indices = list(range(16))
    one = [microbatch_slice(indices, m, 0, 1, 4) for m in range(4)]
    many = [microbatch_slice(indices, 0, r, 4, 4) for r in range(4)]
    assert one == many
    assert torch.equal(torch.tensor(one).flatten(), torch.arange(16))


def test_ranked_lists_become_all_pairs(tmp_path):
    rows = [
        {"prompt": "Rank these.", "ranking": ["best", "good", "fine", "bad"]},
        {"prompt": "And these.", "ranking": ["yes", "no"]},
    ]
    path = write_jsonl(tmp_path / "ranked.jsonl", rows)
    pairs = read_training(DataConfig(train=str(path)), "paired", seed=0)
    assert len(pairs) == 6 + 1  # 4 choose 2, plus 2 choose 2
    order = {"best": 0, "good": 1, "fine": 2, "bad": 3, "yes": 0, "no": 1}
    assert all(order[p.chosen] < order[p.rejected] for p in pairs)
    assert {(p.chosen, p.rejected) for p in pairs if p.prompt == "Rank these."} == {
        ("best", "good"),
        ("best", "fine"),
        ("best", "bad"),
        ("good", "fine"),
        ("good", "bad"),
        ("fine", "bad"),
    }
    unpaired = read_training(DataConfig(train=str(path)), "unpaired", seed=0)
    assert len(unpaired) == 14 and sum(e.label for e in unpaired) == 7


def test_ratings_become_labels_or_pairs(tmp_path):
    rows = [
        {"prompt": "p", "completion": c, "rating": r}
        for c, r in (("great", 3.0), ("nice", 1.2), ("meh", 0.1), ("poor", -1.0), ("awful", -3.5))
    ]
    rows.append(
        {"prompt": "q", "completion": "alone", "rating": "2.5"}
    )  # CSV-style text ratings are numbers too
    path = write_jsonl(tmp_path / "rated.jsonl", rows)
    labelled = read_training(DataConfig(train=str(path)), "unpaired", seed=0)
    assert sorted((e.completion, e.label) for e in labelled) == [
        ("alone", True),
        ("awful", False),
        ("great", True),
        ("nice", True),
        ("poor", False),
    ]
    pairs = read_training(DataConfig(train=str(path), pair_min_gap=2.0), "paired", seed=0)
    assert sorted((p.chosen, p.rejected) for p in pairs) == [
        ("great", "awful"),
        ("great", "meh"),
        ("great", "poor"),
        ("meh", "awful"),
        ("nice", "awful"),
        ("nice", "poor"),
        ("poor", "awful"),
    ]
    capped = read_training(
        DataConfig(train=str(path), pair_min_gap=2.0, max_pairs_per_prompt=2), "paired", seed=0
    )
    assert len(capped) == 2
    demos = read_training(DataConfig(train=str(path)), "completions", seed=0)
    assert sorted(e.completion for e in demos) == ["alone", "great", "nice"]


def test_labels_become_pairs_within_a_prompt(tmp_path):
    rows = [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in paired_rows(6)
        for side in ("chosen", "rejected")
    ]
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    pairs = read_training(DataConfig(train=str(path)), "paired", seed=0)
    labels = {(r["prompt"], r["completion"]): r["label"] for r in rows}
    assert len(pairs) == 6  # each prompt: one desirable x one undesirable
    assert all(labels[(p.prompt, p.chosen)] and not labels[(p.prompt, p.rejected)] for p in pairs)


def test_no_pairs_is_a_clear_error(tmp_path):
    path = write_jsonl(
        tmp_path / "rated.jsonl",
        [
            {"prompt": "p", "completion": "a", "rating": 1.0},
            {"prompt": "p", "completion": "b", "rating": 0.5},
        ],
    )
    with pytest.raises(UserError, match="no preference pairs could be built"):
        read_training(DataConfig(train=str(path)), "paired", seed=0)


def test_csv_text_that_says_true_stays_text(tmp_path):
    """Only a label column reads true/false as booleans; a completion "True" is the text "True"."""
    path = tmp_path / "answers.csv"
    path.write_text("prompt,completion,label\nIs water wet?,True,true\nIs fire cold?,False,FALSE\n")
    kind, examples = parse_rows(read_rows(str(path)), "auto")
    assert kind == "unpaired"
    assert [(e.completion, e.label) for e in examples] == [("True", True), ("False", False)]


def test_an_enormous_row_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text(
        '{"prompt": "p", "completion": "c", "label": true}\n' + '{"prompt": "' + "x" * (17 * 2**20) + '"}\n'
    )
    with pytest.raises(UserError, match=r"big.jsonl:2: a row of 17 MB; expected at most 16 MB per row$"):
        read_rows(str(path))
