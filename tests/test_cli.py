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


def test_options_explains_every_option(capsys):
    code, out, _ = run_cli(["options"], capsys)
    assert code == 0
    import dataclasses

    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert f"{section}.{field.name} = " in out
            assert field.metadata["help"].split()[0] in out
    for name in ("loss.beta", "loss.desirable_weight", "loss.undesirable_weight"):
        assert name in out
    code, out, _ = run_cli(["options", "eval"], capsys)
    assert code == 0 and "eval.every = 0" in out and "train." not in out and "loss." not in out
    code, out, err = run_cli(["options", "evl"], capsys)
    assert code == 2 and err == (
        "error: prospect options: unknown section 'evl' (did you mean 'eval'?); expected model, data, train, "
        "eval, online, loop, loss\n"
    )


def test_help_says_what_prospect_does_and_train_help_is_its_own_flags(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0 and "aligns language models with feedback" in out
    assert all(f"    {command}" in out for command in ("train", "demo", "loop", "score", "options", "report"))
    code, out, _ = run_cli(["train", "--help"], capsys)
    assert code == 0 and "--config" in out and "--resume" in out and "`prospect options`" in out
    assert "train.learning_rate = " not in out and len(out.splitlines()) < 30


def test_train_from_the_command_line(tiny_model_dir, kto_file, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", *tiny_overrides(tiny_model_dir, kto_file, out)], capsys)
    assert code == 0, err
    assert "saved" in stdout and (out / "final" / "config.json").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    code, _, err = run_cli(["train", *tiny_overrides(tiny_model_dir, kto_file, out)], capsys)
    assert code == 2 and "run directory exists" in err


def test_an_unknown_tracker_is_one_line_listing_the_valid_ones(tiny_model_dir, kto_file, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *tiny_overrides(tiny_model_dir, kto_file, out), "train.report_to=tensorbord"]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert err.startswith(
        "error: train.report_to=tensorbord: unknown tracker 'tensorbord' (did you mean 'tensorboard'?); "
        "expected none or aim, clearml, comet_ml, dvclive, mlflow, "
    )


@pytest.mark.parametrize("installed", [[], ["tensorboard"]])
def test_a_tracker_that_is_not_installed_is_an_error_not_a_warning(
    installed, tiny_model_dir, kto_file, tmp_path, capsys, monkeypatch
):
    """accelerate would drop it with a warning and log nothing; prospect refuses before anything loads."""
    import accelerate.tracking

    from prospect.engine.checks import check_trackers

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: installed)
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["train", *tiny_overrides(tiny_model_dir, kto_file, out), "train.report_to=wandb"], capsys
    )
    assert code == 2 and not out.exists()
    assert err == "error: train.report_to=wandb: tracker 'wandb' is not installed (pip install wandb)\n"
    if installed:
        assert check_trackers("tensorboard, none") == ["tensorboard"]
