"""Scalar heads on a transformer trunk: reward models (one score per sequence) and PPO value models (one
value per token).

A reward model is transformers' `AutoModelForSequenceClassification` with one label wherever the
architecture has one, so a trained model loads and scores in plain transformers. prospect scores the
last token of each sequence that is not the pad token, exactly as transformers' classifiers do.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prospect.config import ModelConfig
from prospect.data.batching import Sequences, pad
from prospect.data.layout import SegmentLayout
from prospect.errors import UserError
from prospect.models.attention import model_inputs, unwrapped
from prospect.models.loading import (
    attention_kwargs,
    carry_source,
    first_line,
    hub_kwargs,
    load_model,
    load_tokenizer,
    local_source,
)

log = logging.getLogger(__name__)


class ScalarScorer(nn.Module):
    """trunk -> hidden states -> linear head -> one fp32 scalar per token. Like TokenScorer, it is the module
    accelerate wraps, so every forward goes through DDP/FSDP."""

    def __init__(self, model: nn.Module, head: nn.Module, bf16: bool = False):
        """`model`: a transformers model, or PEFT's around one; `head`: its linear score head (under LoRA, PEFT's
        trainable copy of it)."""
        super().__init__()
        self.model = model
        self.head = head
        self.bf16 = bf16

    def trunk(self) -> nn.Module:
        base = unwrapped(self.model)
        return base.base_model if base.base_model is not base else base

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        layout: SegmentLayout | None = None,
    ) -> torch.Tensor:
        inputs, context = model_inputs(self.trunk(), input_ids, attention_mask, position_ids, layout)
        device = input_ids.device.type
        autocast = torch.autocast(device, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast, context:
            hidden = self.trunk()(**inputs).last_hidden_state
        with torch.autocast(device, enabled=False):
            return self.head(hidden.float()).squeeze(-1)

    def sequence_scores(self, seqs: Sequences, pad_id: int | None) -> torch.Tensor:
        values = self(*seqs.model_inputs())
        return values.flatten()[last_token_positions(seqs, pad_id)]


def last_token_positions(seqs: Sequences, pad_id: int | None) -> torch.Tensor:
    """Flat index of each sequence's last token that is not the pad token (its last token if all are)."""
    index = seqs.sequence_index.flatten()
    flat = torch.arange(index.numel(), device=index.device)
    keep = index >= 0
    if pad_id is not None:
        not_pad = keep & (seqs.input_ids.flatten() != pad_id)
        has = torch.zeros(seqs.num_sequences, dtype=torch.bool, device=index.device)
        has[index[not_pad]] = True
        keep = torch.where(has[index.clamp(min=0)], not_pad, keep)
    positions = torch.full((seqs.num_sequences,), -1, dtype=torch.long, device=index.device)
    return positions.scatter_reduce(0, index[keep], flat[keep], reduce="amax")


def score_in_batches(
    scorer: ScalarScorer,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    device: torch.device,
    batch_size: int = 32,
) -> list[float]:
    """The scorer's score of each (prompt, completion) token list, batched longest first so batches hold
    similar lengths."""
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(completions[i])))
    out = [0.0] * len(prompts)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            seqs = pad([prompts[i] for i in chunk], [completions[i] for i in chunk], pad_id).to(device)
            for i, value in zip(chunk, scorer.sequence_scores(seqs, pad_id).tolist()):
                out[i] = value
    return out


def load_reward_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(sequence classifier with one label, tokenizer). A classifier checkpoint loads as it is; a causal LM
    lends its trunk to a classifier with a fresh score head."""
    source = local_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs(cfg))
    except (OSError, ValueError) as exc:
        raise UserError(f"model '{cfg.name}': could not load its config ({first_line(exc)})") from None
    if any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        model, _ = load_model(cfg, AutoModelForSequenceClassification)
    else:
        causal, _ = load_model(cfg)
        config.num_labels = 1
        config.pad_token_id = tokenizer.pad_token_id
        try:
            model = AutoModelForSequenceClassification.from_config(
                config, dtype=torch.float32, **attention_kwargs(cfg)
            )
        except ValueError as exc:
            raise UserError(
                f"model '{cfg.name}': transformers has no sequence-classification head for "
                f"{type(causal).__name__} ({first_line(exc)})"
            ) from None
        missing, _ = model.load_state_dict(causal.state_dict(), strict=False)
        if any(not k.startswith(("score", "classifier")) for k in missing):
            raise UserError(f"model '{cfg.name}': its trunk does not fit {type(model).__name__}")
        with torch.no_grad():
            score_head(model).weight.normal_(0.0, 1.0 / (config.hidden_size + 1) ** 0.5)
        carry_source(causal, model)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def score_head(model: PreTrainedModel) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear) and head.out_features == 1:
            return head
    raise UserError(f"{type(model).__name__}: expected a linear `score` head with one output")
