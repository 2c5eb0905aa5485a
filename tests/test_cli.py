"""The command line: bad input ends with one line naming file, line, field and expectation; exit 2;
no traceback; no run directory created."""

from __future__ import annotations

import json

import pytest

from prospect.cli import main
from prospect.config import SECTIONS
from tests.conftest import tiny_overrides, unpaired_rows, write_jsonl


def run_cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def rows_with(index: int, **changes) -> list[dict]:
    rows = unpaired_rows(8)
    rows[index].update(changes)
    for key, value in list(changes.items()):
        if value is ...:
            del rows[index][key]
    return rows


BAD_INPUTS = [
    # (name, writer(tmp_path) -> data path, expected message with {path})
    ("missing file", lambda d: d / "nope.jsonl", "{path}: no such file"),
    (
        "malformed json line",
        lambda d: _raw(
            d, '{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", "completion": \n'
        ),
        "{path}:2: not valid JSON (Expecting value at column 31)",
    ),
    (
        "missing field",
        lambda d: write_jsonl(d / "x.jsonl", rows_with(2, completion=...)),
        "{path}:3: field 'completion': expected a value (unpaired rows have prompt, completion, label)",
    ),
    (
        "mistyped field",
        lambda d: write_jsonl(d / "x.jsonl", rows_with(1, prompt=42)),
        "{path}:2: field 'prompt': expected non-empty text or a list of {{role, content}} messages, got 42",
    ),
    (
        "label not boolean",
        lambda d: write_jsonl(d / "x.jsonl", rows_with(4, label="yes")),
        "{path}:5: field 'label': expected a boolean (true or false), got \"yes\"",
    ),
    (
        "empty completion",
        lambda d: write_jsonl(d / "x.jsonl", rows_with(0, completion="  ")),
        "{path}:1: field 'completion': expected non-empty text, got \"  \"",
    ),
    (
        "no undesirable examples",
        lambda d: write_jsonl(d / "x.jsonl", [dict(r, label=True) for r in unpaired_rows(8)]),
        "KTO needs both desirable and undesirable examples; the training data has no undesirable ones "
        "(8 desirable, 0 undesirable)",
    ),
    (
        "not utf-8",
        lambda d: _raw(d, b'{"prompt": "a", "completion": "b", "label": true}\n' + b'{"prompt": "\xff"}\n'),
        "{path}:2: expected UTF-8 text",
    ),
    (
        "bad message",
        lambda d: write_jsonl(d / "x.jsonl", rows_with(3, prompt=[{"role": "user"}])),
        "{path}:4: field 'prompt[0]': expected a message {{role: str, content: str}}, got {{'role': 'user'}}",
    ),
]


def _raw(directory, content) -> object:
    path = directory / "x.jsonl"
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)
    return path


@pytest.mark.parametrize(("name", "make", "expected"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gives_one_clear_line(name, make, expected, tiny_model_dir, tmp_path, capsys):
    data = make(tmp_path)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", *tiny_overrides(tiny_model_dir, data, out)], capsys)
    assert code == 2
    assert err == f"error: {expected.format(path=data)}\n"
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.batch_size=1", "train.batch_size=1: loss 'kto' pairs each prompt"),
        ("loss.name=kt0", "unknown loss 'kt0' (did you mean 'kto'?)"),
        (
            "train.learning_rat=0.1",
            "<defaults>: train: unknown option 'learning_rat' (did you mean 'learning_rate'?)",
        ),
        ("train.max_steps=ten", "<defaults>: train.max_steps: expected a whole number, got 'ten'"),
        ("train.precision=fp8", "<defaults>: train.precision: expected one of auto, bf16, fp32, got 'fp8'"),
        ("loss.gamma=1", "<defaults>: loss: unknown option 'gamma'"),
        ("train.resume=true", None),
    ],
)
def test_bad_options(override, expected, tiny_model_dir, kto_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *tiny_overrides(tiny_model_dir, kto_file, out), override]
    if expected is None:  # resume + overwrite together contradict
        argv.append("--overwrite")
        expected = "train.resume and train.overwrite contradict each other; choose one"
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.startswith(f"error: {expected}") and err.count("\n") == 1
    assert not out.exists()


def test_recipe_errors_name_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rate: [1\n")
    code, _, err = run_cli(["train", "--config", str(recipe)], capsys)
    assert code == 2 and err.startswith(f"error: {recipe}:3: not valid YAML")
    recipe.write_text("trian:\n  learning_rate: 1\n")
    code, _, err = run_cli(["train", "--config", str(recipe)], capsys)
    assert err == f"error: {recipe}: unknown section 'trian' (did you mean 'train'?)\n"


def test_help_explains_every_option(capsys):
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0
    import dataclasses

    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert f"{section}.{field.name} = " in out
            assert field.metadata["help"].split()[0] in out
    for name in ("loss.beta", "loss.desirable_weight", "loss.undesirable_weight"):
        assert name in out


def test_train_from_the_command_line(tiny_model_dir, kto_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", *tiny_overrides(tiny_model_dir, kto_file, out)], capsys)
    assert code == 0, err
    assert "saved" in stdout and (out / "final" / "config.json").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    code, _, err = run_cli(["train", *tiny_overrides(tiny_model_dir, kto_file, out)], capsys)
    assert code == 2 and "run directory exists" in err
