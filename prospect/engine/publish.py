"""Publishing a run's final model on the Hugging Face Hub: `prospect push RUN --repo-id owner/name`, or
`train.push_to_hub` at the end of a run. final/ (weights, tokenizer, model card, LoRA adapter) is uploaded
with huggingface_hub's `HfApi.create_repo` and `upload_folder`.

The token is huggingface_hub's own: `HF_TOKEN`, or the one `hf auth login` stored. prospect never reads it
into a message or a log, and never takes it on the command line (where `ps` and shell history would show it).
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.utils import validate_repo_id

from prospect.config import TrainConfig
from prospect.engine.model_card import write_model_card
from prospect.errors import UserError, first_line

log = logging.getLogger(__name__)


def check_push_target(repo_id: str, where: str) -> None:
    """A valid repo id and a token to push with, checked before anything long runs."""
    try:
        validate_repo_id(repo_id)
    except ValueError as exc:  # HFValidationError
        raise UserError(
            f"{where}={repo_id}: not a hub repo id ({first_line(exc)}); expected owner/name"
        ) from None
    if repo_id.count("/") != 1:
        raise UserError(f"{where}={repo_id}: expected owner/name (your user or organisation, then the model)")
    if get_token() is None:
        raise UserError(f"{where}: no Hugging Face token; set HF_TOKEN or run `hf auth login` first")


def final_dir(run: Path) -> Path:
    """A run directory's final/ (or final/ itself), with its model card."""
    final = run if (run / "config.json").is_file() and run.name == "final" else run / "final"
    if not (final / "config.json").is_file():
        raise UserError(f"{run}: no final model (final/config.json); push a run that trained to the end")
    if not (final / "README.md").is_file() and (final.parent / "config.yaml").is_file():
        write_model_card(final.parent)  # a run from before model cards
    return final


def push(
    run: Path, repo_id: str, public: bool = False, message: str | None = None, where: str = "--repo-id"
) -> str:
    """Upload the run's final/ to `repo_id` (created private unless `public`; an existing repo keeps its
    visibility) and return the commit's URL."""
    check_push_target(repo_id, where)
    final = final_dir(run)
    api = HfApi()
    try:
        api.create_repo(repo_id, private=not public, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=final,
            repo_type="model",
            commit_message=message or f"prospect: {final.parent.name}",
        )
    except Exception as exc:  # the hub's HTTP errors, a network that is down, a refused token
        raise UserError(f"push to {repo_id} failed: {type(exc).__name__}: {first_line(exc)}") from None
    url = str(getattr(commit, "commit_url", "") or f"https://huggingface.co/{repo_id}")
    log.info("pushed %s to %s", final, url)
    return url


def finish_run(run_dir: Path, train: TrainConfig, loss_params: object, steps: int) -> None:
    """The end of a run, on the main process: final/README.md with the held-out results and the loss options
    as trained, then final/ pushed to train.push_to_hub when set."""
    write_model_card(run_dir, loss_params, steps)
    if train.push_to_hub:
        url = push(run_dir, train.push_to_hub, where="train.push_to_hub")
        print(f"pushed {run_dir / 'final'}: {url}", flush=True)
