"""`prospect push` and `train.push_to_hub` publish final/ through huggingface_hub's HfApi, here a stand-in with
HfApi's own signatures (create_autospec): a call the real client would refuse fails the test. No network."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import create_autospec

import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError

from prospect import cli
from prospect.engine import publish
from prospect.engine.trainer import Trainer
from prospect.errors import UserError
from prospect.recipe import load_config
from tests.helpers import tiny_overrides, unpaired_rows, write_jsonl

SECRET = "hf_prospectTestToken0123456789"
FORBIDDEN = SimpleNamespace(
    headers={}, request=None, status_code=403
)  # what HfHubHTTPError reads of a response


class StandIn:
    """Every HfApi() made by prospect, with what each upload_folder found in the folder it was given."""

    def __init__(self, fail: Exception | None = None):
        self.apis: list = []
        self.uploaded: list[set[str]] = []
        self.fail = fail

    def __call__(self, *args, **kwargs):
        api = create_autospec(HfApi, instance=True)
        api.create_repo.side_effect = self.fail
        api.upload_folder.side_effect = self.upload
        self.apis.append(api)
        return api

    def upload(self, *, repo_id, folder_path, **kwargs):
        self.uploaded.append({p.name for p in Path(folder_path).iterdir()})
        return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/0123abc")


@pytest.fixture
def hub(monkeypatch, tmp_path) -> StandIn:
    stand_in = StandIn()
    monkeypatch.setattr(publish, "HfApi", stand_in)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # only the env's token
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return stand_in


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pushed")
    data = write_jsonl(root / "feedback.jsonl", unpaired_rows())
    Trainer(
        load_config(None, tiny_overrides(tiny_model_dir, data, root / "run", **{"train.max_steps": 1}))
    ).train()
    return root / "run"


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    return int(done.value.code or 0)


def test_push_uploads_final_with_its_model_card(hub, finished_run, capsys, caplog):
    assert run_cli(["push", str(finished_run), "--repo-id", "me/tiny-kto"]) == 0
    (api,) = hub.apis
    api.create_repo.assert_called_once_with("me/tiny-kto", private=True, repo_type="model", exist_ok=True)
    call = api.upload_folder.call_args.kwargs
    assert (call["repo_id"], Path(call["folder_path"])) == ("me/tiny-kto", finished_run / "final")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= hub.uploaded[0]
    out = capsys.readouterr()
    assert "https://hub.invalid/me/tiny-kto/commit/0123abc" in out.out
    assert SECRET not in out.out + out.err + caplog.text


def test_push_of_a_run_from_before_model_cards_writes_one(hub, finished_run, tmp_path):
    old = tmp_path / "old-run"
    shutil.copytree(finished_run, old)
    (old / "final" / "README.md").unlink()
    assert run_cli(["push", str(old / "final"), "--repo-id", "me/old", "--public"]) == 0
    hub.apis[0].create_repo.assert_called_once_with("me/old", private=False, repo_type="model", exist_ok=True)
    assert "README.md" in hub.uploaded[0]


@pytest.mark.parametrize(
    ("token", "repo_id", "expected"),
    [
        (None, "me/tiny", "--repo-id: no Hugging Face token; set HF_TOKEN or run `hf auth login` first"),
        (SECRET, "tiny", "--repo-id=tiny: expected owner/name"),
        (SECRET, "me/bad name", "--repo-id=me/bad name: not a hub repo id"),
    ],
)
def test_push_refuses_before_any_request(token, repo_id, expected, hub, finished_run, monkeypatch, capsys):
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    assert run_cli(["push", str(finished_run), "--repo-id", repo_id]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not hub.apis


def test_push_without_a_final_model_and_a_hub_error_are_one_line(
    hub, finished_run, tmp_path, monkeypatch, capsys
):
    assert run_cli(["push", str(tmp_path), "--repo-id", "me/tiny"]) == 2
    assert f"{tmp_path}: no final model" in capsys.readouterr().err
    refused = StandIn(fail=HfHubHTTPError("403 Forbidden: you cannot write to me/tiny", response=FORBIDDEN))
    monkeypatch.setattr(publish, "HfApi", refused)
    assert run_cli(["push", str(finished_run), "--repo-id", "me/tiny"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "error: push to me/tiny failed: HfHubHTTPError: 403 Forbidden: you cannot write to me/tiny\n"
    )
    assert SECRET not in err


def test_train_push_to_hub_publishes_at_the_end(hub, tiny_model_dir, kto_file, tmp_path, monkeypatch):
    options = {"train.max_steps": 1, "train.push_to_hub": "me/pushed"}
    final = Trainer(
        load_config(None, tiny_overrides(tiny_model_dir, kto_file, tmp_path / "run", **options))
    ).train()
    (api,) = hub.apis
    assert Path(api.upload_folder.call_args.kwargs["folder_path"]) == final
    assert "README.md" in hub.uploaded[0]
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(UserError, match=r"train\.push_to_hub: no Hugging Face token"):
        Trainer(load_config(None, tiny_overrides(tiny_model_dir, kto_file, tmp_path / "again", **options)))
    assert not (tmp_path / "again").exists()
