"""Batched sampling from a causal LM: left padding, KV cache, stop at EOS, seeded."""

from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    bf16: bool = False,
) -> list[list[int]]:
    """One completion per prompt, as token ids ending with EOS when the model stopped by itself.
    Runs on a forked RNG so sampling never shifts the training run's random stream."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    completions: list[list[int]] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                input_ids[i, width - len(p) :] = torch.tensor(p)
                attention[i, width - len(p) :] = 1
            autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with autocast:
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=temperature or None,
                    top_p=top_p,
                    top_k=0,
                    eos_token_id=eos_id,
                    pad_token_id=pad_id,
                )
            for row in output[:, width:].tolist():
                completions.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    model.train(was_training)
    return completions
