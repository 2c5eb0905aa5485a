"""The command line: options, --help, and bad options (bad data: tests/test_hostile_input.py)."""

from __future__ import annotations

import json

import pytest

from prospect.cli import main
from prospect.config import SECTIONS
from tests.helpers import tiny_overrides


def run_cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


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
