"""Models as users have them: a base model without a chat template (model.chat_template), final/ in the dtype
the model came in with a model card, and a LoRA adapter that names the model the user gave."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer

from prospect.config import ModelConfig
from prospect.data.tokenize import Encoder
from prospect.engine.model_card import hub_base_model
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.models.chat_templates import BUILTIN, set_chat_template
from prospect.models.loading import given_name
from prospect.models.sampling import stop_tokens
from prospect.recipe import load_config
from tests.helpers import (
    build_model,
    build_tokenizer,
    paired_rows,
    tiny_overrides,
    unpaired_rows,
    write_jsonl,
)

CONVERSATION = (
    [{"role": "user", "content": "Review the cartoon."}],
    [{"role": "assistant", "content": "It was good."}],
)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    """The tiny model with its tokenizer's chat template removed, as a base model ships."""
    directory = tmp_path_factory.mktemp("tiny-base")
    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    build_model(len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-bf16")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).to(torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_trainer(model_dir: Path, data: Path, out: Path, **extra) -> Trainer:
    return Trainer(load_config(None, tiny_overrides(model_dir, data, out, **extra)))


def test_conversational_data_on_a_base_model_names_the_way_out(base_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", unpaired_rows(conversational=True))
    with pytest.raises(UserError, match=r"set model\.chat_template to a Jinja file or a built-in \(chatml"):
        make_trainer(base_model_dir, data, tmp_path / "run")


def test_a_built_in_template_trains_a_base_model_and_ships_in_final(base_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", unpaired_rows(conversational=True))
    trainer = make_trainer(
        base_model_dir, data, tmp_path / "run", **{"model.chat_template": "chatml", "train.max_steps": 2}
    )
    reference = build_tokenizer()  # the same vocabulary with the tests' ChatML template, the same text
    prompt, completion = (
        unpaired_rows(conversational=True)[0]["prompt"],
        unpaired_rows(conversational=True)[0]["completion"],
    )
    expected = reference.apply_chat_template(prompt + completion, tokenize=False)
    item = trainer.data.items[0]
    assert trainer.tokenizer.decode(item.prompt_ids + item.completion_ids) == expected
    assert item.completion_ids[-2] == trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    final = trainer.train()
    saved = AutoTokenizer.from_pretrained(final)
    assert saved.chat_template == BUILTIN["chatml"][0]
    assert saved.apply_chat_template(prompt, tokenize=False) == reference.apply_chat_template(
        prompt, tokenize=False
    )


def test_plain_text_on_a_base_model_needs_no_template(base_model_dir, kto_file, tmp_path):
    trainer = make_trainer(base_model_dir, kto_file, tmp_path / "run", **{"train.max_steps": 1})
    assert trainer.tokenizer.chat_template is None
    assert trainer.train().is_dir()


def test_a_template_file_whose_turns_end_with_eos(tiny_tokenizer, tmp_path):
    file = tmp_path / "turns.jinja"
    file.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tokenizer = build_tokenizer()
    set_chat_template(tokenizer, str(file))
    assert tokenizer.chat_template == file.read_text()
    encoded = Encoder(tokenizer, 48, 24).encode(*CONVERSATION, True, "row 1")
    assert tokenizer.decode(encoded.prompt_ids) == "[user] Review the cartoon.<|im_end|>[assistant] "
    assert encoded.completion_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            None,
            r"model\.chat_template=.*: no such file and not a built-in template \(chatml, zephyr, gemma\)",
        ),
        ("{% for m in messages %}", r"cannot render a user/assistant exchange"),
        ("{{ raise_exception('roles must alternate') }}", r"cannot render .*roles must alternate"),
        ("  \n", r"the file is empty"),
    ],
)
def test_a_bad_template_is_one_line_naming_the_option(content, expected, tmp_path):
    file = tmp_path / "template.jinja"
    if content is not None:
        file.write_text(content)
    with pytest.raises(UserError, match=expected) as error:
        set_chat_template(build_tokenizer(), str(file))
    assert "\n" not in str(error.value)


def test_gemma_template_renders_gemma_turns_and_stops_at_end_of_turn():
    """Gemma's base tokenizer has <start_of_turn> and <end_of_turn> as special added tokens, not among the
    named special tokens: generation must still stop at <end_of_turn>."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(
        [AddedToken("<start_of_turn>", special=True), AddedToken("<end_of_turn>", special=True)]
    )
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn not in tokenizer.all_special_ids
    set_chat_template(tokenizer, "gemma")
    text = tokenizer.apply_chat_template(CONVERSATION[0], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|><start_of_turn>user\nReview the cartoon.<end_of_turn>\n<start_of_turn>model\n"
    assert end_of_turn in stop_tokens(tokenizer)


def test_chatml_on_a_vocabulary_without_its_markers_warns(caplog):
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(
        [AddedToken("<start_of_turn>", special=True), AddedToken("<end_of_turn>", special=True)]
    )
    with caplog.at_level(logging.WARNING, logger="prospect"):
        set_chat_template(tokenizer, "chatml")  # the tests' vocabulary has ChatML's markers: no warning
        assert not caplog.records
        set_chat_template(build_tokenizer(), "gemma")
    assert "<start_of_turn> and <end_of_turn> are not one token of this vocabulary" in caplog.text


@pytest.mark.parametrize("lora", [0, 4])
def test_final_is_saved_in_the_dtype_the_model_came_in_with_a_model_card(
    lora, bf16_model_dir, kto_file, tmp_path
):
    options = {"train.max_steps": 2, "model.lora_r": lora, "eval.num_prompts": 2, "eval.max_new_tokens": 4}
    trainer = make_trainer(bf16_model_dir, kto_file, tmp_path / "run", **options)
    final = trainer.train()
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}  # noqa: SIM118
        saved = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    policy = trainer.accelerator.unwrap_model(trainer.policy).model
    trained = (policy.merge_and_unload() if lora else policy).state_dict()
    assert all(torch.equal(saved[name], trained[name].to(torch.bfloat16)) for name in saved)
    assert AutoModelForCausalLM.from_pretrained(final, dtype="auto").dtype == torch.bfloat16
    if lora:
        adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
        assert adapter["base_model_name_or_path"] == str(bf16_model_dir.resolve())
    card = ModelCard.load(final / "README.md")
    assert card.data.base_model is None  # a local path is named in the text, not as a hub id
    assert {"prospect", "kto"} <= set(card.data.tags)
    text = card.text
    assert f"Fine-tuned from `{bf16_model_dir.resolve()}`" in text
    assert "| `train.learning_rate` | 0.001 |" in text and "| `steps trained` | 2 |" in text
    after = json.loads((tmp_path / "run" / "eval_after.json").read_text())
    assert f"| `kl_mean` | 0 | {after['kl_mean']:.4g} |" in text


def test_an_fp32_model_stays_fp32_and_its_card_gives_the_loss_options_as_trained(tiny_model_dir, tmp_path):
    rows = [r for r in unpaired_rows() if not r["label"]] + [r for r in unpaired_rows() if r["label"]][:3]
    data = write_jsonl(tmp_path / "imbalanced.jsonl", rows)
    options = {"train.max_steps": 1, "loss.auto_weights": True}
    trainer = make_trainer(tiny_model_dir, data, tmp_path / "run", **options)
    final = trainer.train()
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}  # noqa: SIM118
    text = ModelCard.load(final / "README.md").text
    assert "No held-out evaluation was run" in text
    weight = trainer.params.desirable_weight  # from the counts, not the 1.0 of config.yaml
    assert weight > 2 and f"| `desirable_weight` | {weight:.4g} |" in text


def test_the_model_is_named_as_the_user_gave_it(tmp_path, monkeypatch):
    assert given_name(ModelConfig(name="smollm2")) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert given_name(ModelConfig(name="gemma3-270m")) == "google/gemma-3-270m"
    assert given_name(ModelConfig(name="owner/model")) == "owner/model"
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    assert given_name(ModelConfig(name="mine")) == str(tmp_path / "mine")
    config = load_config(None, ["model.name=owner/model"])
    assert hub_base_model(config) == "owner/model"
    assert hub_base_model(load_config(None, [])) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_base_model(load_config(None, ["model.name=mine"])) is None


def test_a_reward_model_built_from_a_bf16_causal_lm_is_saved_in_bf16(bf16_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", paired_rows(8))
    options = {"loss.name": "reward_bt", "train.max_steps": 1}
    final = make_trainer(bf16_model_dir, data, tmp_path / "run", **options).train()
    with safe_open(str(final / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"BF16"}  # noqa: SIM118
    assert ModelCard.load(final / "README.md").data.pipeline_tag == "text-classification"
