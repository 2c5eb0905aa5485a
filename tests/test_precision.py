"""In bf16 the implied reward means what it means in fp32: weights de-quantized from GGUF codes sit on bf16
rounding ties, so the first small update of a bf16 run moved them by whole bf16 steps and log pi/pi_ref
jumped; stored as their bf16 values (as the GGUF conversion now does), bf16 never moves further from fp32
than fp32 moves from the start."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from prospect.data.batching import pad
from prospect.engine.trainer import Trainer
from prospect.models.precision import autocast_linears, bf16_tie_fraction, round_to_bf16
from prospect.recipe import load_config
from tests.helpers import build_tokenizer, dequantized_model, tiny_overrides, unpaired_rows, write_jsonl

STEPS, LR = 1, 5e-7  # one optimizer step, as in the report that found the problem


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[bool, Path]:
    """The same de-quantized small Llama, as it comes (False) and stored as bf16 values (True)."""
    out = {}
    for rounded in (False, True):
        directory = tmp_path_factory.mktemp(f"dequantized-{rounded}")
        tokenizer = build_tokenizer()
        model = dequantized_model(len(tokenizer))
        if rounded:
            round_to_bf16(model)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[rounded] = directory
    return out


def test_rounding_removes_the_ties_and_leaves_the_bf16_forward_unchanged():
    model = dequantized_model(400)
    assert bf16_tie_fraction(model) > 0.05  # Q4_1 codes decode onto ties (9.6% in SmolLM2-135M)
    ids = torch.arange(24).unsqueeze(0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
    embeddings = model.get_input_embeddings().weight.clone()
    assert round_to_bf16(model) > 0
    assert bf16_tie_fraction(model) == 0
    for module in autocast_linears(model):
        assert torch.equal(module.weight, module.weight.to(torch.bfloat16).float())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, before)
    # the tied output projection (prospect's head runs it in fp32) and the embeddings keep full precision
    assert torch.equal(model.get_input_embeddings().weight, embeddings)


def log_ratios(model_dir: Path, data: Path, out: Path, precision: str) -> list[float]:
    overrides = tiny_overrides(
        model_dir,
        data,
        out,
        **{
            "train.precision": precision,
            "train.learning_rate": LR,
            "train.max_steps": STEPS,
            "train.batch_size": 8,
        },
    )
    trainer = Trainer(load_config(None, overrides))
    trainer.train()
    items = trainer.data.items[:16]
    probe = pad(
        [it.prompt_ids for it in items], [it.completion_ids for it in items], trainer.tokenizer.pad_token_id
    )
    with torch.no_grad():
        return (
            probe.per_sequence(trainer.policy_token_logps(probe)) - trainer.live_reference(probe)
        ).tolist()


@pytest.mark.parametrize("rounded", [False, True])
def test_bf16_log_ratio_tracks_fp32_after_small_steps(rounded, model_dirs, tmp_path):
    """After a step at lr 5e-7, bf16's implied reward differs from fp32's by about fp32's own movement at most:
    a change below half a bf16 step is invisible to a bf16 forward (only the fp32 embeddings and norms show
    it), so closer is not possible. With the ties the bf16 ratio overshoots to 5.8 times fp32's movement."""
    data = write_jsonl(tmp_path / "kto.jsonl", unpaired_rows(48))
    fp32 = log_ratios(model_dirs[rounded], data, tmp_path / "fp32", "fp32")
    bf16 = log_ratios(model_dirs[rounded], data, tmp_path / "bf16", "bf16")
    gap = statistics.fmean(abs(a - b) for a, b in zip(fp32, bf16))
    moved = statistics.fmean(abs(a) for a in fp32)
    assert (gap <= 1.5 * moved + 5e-4) == rounded, (gap, moved)  # unrounded: 5.8x fp32's movement
