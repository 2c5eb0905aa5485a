"""A corpus of bad inputs (tests/bad_inputs/cases.yaml): each ends with exactly one line naming the file,
line or row, field and expectation; exit code 2; no traceback; no run directory created or touched."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from prospect.cli import main
from prospect.config import DataConfig
from prospect.data.pipeline import read_training
from prospect.errors import UserError
from tests.helpers import tiny_overrides, unpaired_rows, write_jsonl

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


@pytest.fixture(scope="module")
def pickled_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with pickle weights only (pytorch_model.bin), as old checkpoints have."""
    directory = tmp_path_factory.mktemp("pickled")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((tiny_model_dir / name).read_bytes())
    return directory


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_corpus_is_large():
    assert len(CASES) >= 150


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, tiny_model_dir, pickled_model, tmp_path, capsys):
    case = CASES[name]
    out = tmp_path / "run"
    if "recipe" in case:
        argv = ["train", "--config", str(CORPUS / case["recipe"])]
    else:
        overrides = [o.replace("{pickle}", str(pickled_model)) for o in case["overrides"]]
        command = case.get("command", "train")
        argv = [command, *tiny_overrides(tiny_model_dir, CORPUS / case["data"], out), *overrides]
    watched = (CORPUS, tiny_model_dir, pickled_model, tmp_path)
    before = files_state(watched)
    code, err = run_cli(argv, capsys)
    expected = case["error"].replace("{dir}", str(CORPUS)).replace("{pickle}", str(pickled_model))
    assert code == 2
    assert err == expected + "\n"
    assert "Traceback" not in err
    assert not out.exists()
    assert files_state(watched) == before  # no input, and nothing else, was touched


def files_state(roots) -> dict:
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in Path(r).rglob("*") if p.is_file()
    }


def test_bad_input_never_touches_an_existing_run(tiny_model_dir, kto_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = run_cli(
        ["train", *tiny_overrides(tiny_model_dir, kto_file, out, **{"train.max_steps": 1})], capsys
    )
    assert code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, err = run_cli(
        ["train", "--overwrite", *tiny_overrides(tiny_model_dir, CORPUS / "label_string.jsonl", out)], capsys
    )
    assert code == 2 and "field 'label'" in err
    assert {
        p: p.read_bytes() for p in out.rglob("*") if p.is_file()
    } == before  # --overwrite waited for good data


def test_pickle_checkpoints_load_when_allowed(pickled_model, kto_file, tmp_path, capsys):
    argv = ["train", *tiny_overrides(pickled_model, kto_file, tmp_path / "run"), "model.allow_pickle=true"]
    assert run_cli(argv, capsys)[0] == 0


VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
KEYS = st.sampled_from(
    [
        "prompt",
        "completion",
        "label",
        "chosen",
        "rejected",
        "rating",
        "ranking",
        "scores",
        "margin",
        "id",
        "role",
        "content",
        "other",
    ]
)
ROWS = st.lists(
    st.dictionaries(
        KEYS,
        VALUES
        | st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=10)}
            ),
            max_size=3,
        ),
        max_size=5,
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=ROWS,
    needs=st.sampled_from(["unpaired", "paired", "completions", "ranked", "rated", "prompts"]),
    fmt=st.sampled_from(["jsonl", "json", "csv"]),
)
def test_loaders_give_a_clean_result_or_a_clean_error(rows, needs, fmt, tmp_path):
    path = tmp_path / f"fuzz.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        keys = sorted({k for r in rows for k in r}) or ["prompt"]
        lines = [",".join(keys)] + [
            ",".join(json.dumps(r.get(k, "")).replace(",", ";") for k in keys) for r in rows
        ]
        path.write_text("\n".join(lines) + "\n")
    try:
        read_training(DataConfig(train=str(path)), needs, seed=0)
    except UserError as error:
        assert "\n" not in str(error)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_raw_bytes_give_a_clean_result_or_a_clean_error(data, tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(data)
    try:
        read_training(DataConfig(train=str(path)), "unpaired", seed=0)
    except UserError as error:
        assert "\n" not in str(error)


def test_well_formed_rows_still_load(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", unpaired_rows(4))
    assert len(read_training(DataConfig(train=str(path)), "unpaired", seed=0)) == 4


def test_a_hub_name_with_no_hub_fails_at_once(tiny_model_dir, kto_file, tmp_path, capsys, monkeypatch):
    """No minute of retries and forty warning lines: one line, in seconds (the endpoint is a closed local port)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    argv = [
        "train",
        *tiny_overrides(tiny_model_dir, kto_file, tmp_path / "run"),
        "model.name=someone/no-model",
    ]
    code, err = run_cli(argv, capsys)
    assert code == 2 and time.perf_counter() - started < 15
    assert re.fullmatch(
        r"error: model 'someone/no-model': not a local path and not in the hub cache, and "
        r"(http://127\.0\.0\.1:9 cannot be reached \(.*\)|HF_HUB_OFFLINE is set); pass a local directory or "
        r"\.gguf file, or download the model where the hub is reachable\n",
        err,
    ), err
    assert not (tmp_path / "run").exists()
