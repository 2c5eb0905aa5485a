"""The main job on the real SmolLM2-135M-Instruct and the real VADER ratings (slow: ~15 minutes)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prospect.cli import main
from prospect.models.default import smollm2_gguf
from prospect.models.loading import check_saved_weights, convert_gguf

pytestmark = pytest.mark.slow


def test_gguf_conversion_keeps_the_weights(tmp_path):
    gguf = smollm2_gguf()
    directory = convert_gguf(str(gguf.parent), gguf.name)
    model = AutoModelForCausalLM.from_pretrained(directory)
    check_saved_weights(model, __import__("pathlib").Path(directory))
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    for name, tensor in direct.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_demo_improves_judged_positivity(tmp_path):
    run = tmp_path / "demo"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output-dir", str(run)])
    assert exit_info.value.code == 0
    report = json.loads((run / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["kl_mean"] == 0.0
    gain = after["judge_mean"] - before["judge_mean"]
    noise = (before["judge_stderr"] ** 2 + after["judge_stderr"] ** 2) ** 0.5
    assert gain > 2 * noise, report
    assert 0 < after["kl_mean"] < 20
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Write a one-sentence movie review."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert model.generate(**prompt, max_new_tokens=8).shape[1] > prompt["input_ids"].shape[1]
