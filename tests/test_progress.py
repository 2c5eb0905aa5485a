"""Progress of long phases: a bar with an ETA on a terminal, a line every few percent in a log file, nothing
for a phase of a few seconds; the sampler reports token by token; transformers' GGUF loop is routed through it."""

from __future__ import annotations

import re
import sys
import types

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from prospect.models.sampling import HFSampler, SamplingParams
from prospect.progress import Progress, duration, reporting

LINE = re.compile(r"^phase: (\d+)/40 items \((\d+)%\), \d+s elapsed, eta (\d+s|\?)$")


def test_a_log_file_gets_a_line_every_few_percent(capsys, monkeypatch):
    monkeypatch.setattr(Progress, "interval", 0.0)
    with Progress("phase", 40, "items", percent=10) as progress:
        for _ in range(40):
            progress.update(0.5)
            progress.update(0.5)
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [int(LINE.match(line).group(2)) for line in lines] == list(range(10, 101, 10)), out
    assert LINE.match(lines[-1]).group(1) == "40" and err == ""


def test_a_quick_phase_and_other_processes_print_nothing(capsys):
    with Progress("phase", 40, "items") as progress:  # 10 s between lines: this takes milliseconds
        for _ in range(40):
            progress.update()
    with Progress("phase", 40, "items", show=False) as progress:
        progress.update(40)
    assert capsys.readouterr() == ("", "")


def test_a_terminal_gets_a_bar_with_an_eta_and_no_lines(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    monkeypatch.setattr(Progress, "interval", 0.0)
    with Progress("phase", 40, "items") as progress:
        for _ in range(40):
            progress.update()
    out, err = capsys.readouterr()
    assert out == "" and "phase: 100%" in err and "40/40" in err and "<" in err  # elapsed<eta


def test_durations_read_as_time():
    assert [duration(s) for s in (0.4, 42, 185, 3 * 3600 + 420)] == ["0s", "42s", "3m05s", "3h07m"]


def test_the_sampler_reports_each_token_and_samples_the_same(tiny_model_dir, monkeypatch):
    """Token by token up to the whole count (samples that stop early are made up at the end of the batch),
    and the progress hook changes no sample."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sampler = HFSampler(model, tokenizer, batch_size=3)
    prompts = [
        tokenizer("Review the cartoon.")["input_ids"],
        tokenizer("Review the old western.")["input_ids"],
    ] * 4
    params = SamplingParams(max_new_tokens=6, n=2, seed=3)
    updates: list[float] = []
    progress = Progress("sampling", len(prompts) * 2, "samples", show=False)
    monkeypatch.setattr(progress, "update", lambda n=1: updates.append(n) or Progress.update(progress, n))
    with_progress = sampler.generate(prompts, params, progress)
    assert progress.done == pytest.approx(16) and len(updates) > 6  # several per batch of 3
    plain = sampler.generate(prompts, params)
    assert [[s.token_ids for s in group] for group in plain] == [
        [s.token_ids for s in group] for group in with_progress
    ]


def test_a_library_loop_reports_through_progress_and_is_put_back(capsys, monkeypatch):
    monkeypatch.setattr(Progress, "interval", 0.0)
    library = types.SimpleNamespace(tqdm=lambda items, **kwargs: items)
    original = library.tqdm
    with reporting(library, "converting", "tensors"):  # type: ignore[arg-type]
        seen = list(library.tqdm(range(20), desc="Converting and de-quantizing GGUF tensors..."))
    assert seen == list(range(20)) and library.tqdm is original
    assert capsys.readouterr().out.splitlines()[-1].startswith("converting: 20/20 tensors (100%)")


def test_transformers_still_de_quantizes_gguf_through_its_module_tqdm():
    """The hook point prospect's GGUF conversion reports through (a transformers release that renames it
    loses the progress, and this test says so)."""
    import inspect

    import transformers.modeling_gguf_pytorch_utils as gguf_loader

    assert hasattr(gguf_loader, "tqdm")
    assert "tqdm(reader.tensors" in inspect.getsource(gguf_loader.load_gguf_checkpoint)
