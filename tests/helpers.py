"""Test helpers: a tiny Llama and a byte-level BPE tokenizer with a ChatML template, built in-process (no
download), small feedback files, and overrides that make a recipe run in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GOOD = [
    "a wonderful film",
    "great acting and a moving story",
    "lovely and warm",
    "a delight from start to end",
]
BAD = ["a dull mess", "awful acting and a boring plot", "tedious and cold", "a waste of two hours"]
TOPICS = [
    "the space movie",
    "the old western",
    "the new comedy",
    "the war drama",
    "the cartoon",
    "the thriller",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    corpus = [f"Review {t}. It was {g}. It was {b}." for t in TOPICS for g in GOOD for b in BAD] * 3
    corpus += ["It was good."] * 300  # one whole-word token for the PPO test's reward
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHATML
    return fast


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def unpaired_rows(n: int = 48, conversational: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        topic, good = TOPICS[i % len(TOPICS)], i % 2 == 0
        text = (GOOD if good else BAD)[(i // 2) % 4]
        prompt = f"Review {topic}."
        completion = f"It was {text}."
        if conversational:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                    "label": good,
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": completion, "label": good})
    return rows


def paired_rows(n: int = 24, conversational: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"Review {TOPICS[i % len(TOPICS)]}."
        chosen, rejected = f"It was {GOOD[i % 4]}.", f"It was {BAD[i % 4]}."
        if conversational:
            user = [{"role": "user", "content": prompt}]
            rows.append(
                {
                    "chosen": [*user, {"role": "assistant", "content": chosen}],
                    "rejected": [*user, {"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def varied_paired_rows(n: int = 24) -> list[dict]:
    """Pairs whose rejected completions are six times as long in one row of three, so packed rows hold
    several sequences."""
    rows = paired_rows(n)
    for i, row in enumerate(rows):
        row["rejected"] = (row["rejected"] + " ") * (6 if i % 3 == 0 else 1)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_overrides(model_dir: Path, data: Path, out: Path, **extra) -> list[str]:
    """Overrides that make a recipe run in seconds on the tiny model."""
    values = {
        "model.name": str(model_dir),
        "data.train": str(data),
        "data.max_length": 48,
        "data.max_prompt_length": 24,
        "train.output_dir": str(out),
        "train.batch_size": 4,
        "train.max_steps": 4,
        "train.learning_rate": 1e-3,
        "train.warmup_ratio": 0.0,
        "train.lr_scheduler": "constant",
        "train.precision": "fp32",
        "train.log_every": 100,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def q4_1_dequantized(weight: torch.Tensor) -> torch.Tensor:
    """`weight` coded as GGUF's Q4_1 (blocks of 32: an fp16 scale d and minimum m, levels 0..15) and decoded
    to fp32, as a GGUF checkpoint's de-quantized weights are. Many decoded values sit on bf16 rounding ties."""
    flat = weight.detach().float().reshape(-1, 32)
    low, high = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    d = ((high - low) / 15).half().float()
    m = low.half().float()
    q = ((flat - m) / d.clamp(min=1e-8)).round().clamp(0, 15)
    return (q * d + m).reshape(weight.shape)


def dequantized_model(vocab_size: int, hidden: int = 128, layers: int = 4, seed: int = 3) -> LlamaForCausalLM:
    """A small Llama of real proportions whose linear weights are Q4_1-de-quantized (see q4_1_dequantized)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(hidden // 32, 1) * 2,
        num_key_value_heads=max(hidden // 32, 1),
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(q4_1_dequantized(module.weight))
    return model


def miniature(recipe: str, model_dir, run_dir, **extra) -> list[str]:
    """Overrides that run a shipped online recipe in miniature on the tiny model: 2 steps of 2 prompts, 4 new
    tokens, 4 held-out prompts evaluated after each step."""
    values = {
        "model.name": str(model_dir),
        "train.output_dir": str(run_dir),
        "train.max_steps": 2,
        "train.batch_size": 2,
        "train.precision": "fp32",
        "online.max_new_tokens": 4,
        "eval.num_prompts": 4,
        "eval.max_new_tokens": 4,
        "eval.every": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]
