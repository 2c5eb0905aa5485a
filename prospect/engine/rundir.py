"""The run directory: never overwritten silently, resumable only with the config it was started with."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import yaml

from prospect import __version__
from prospect.config import Config
from prospect.errors import UserError
from prospect.io import write_text_atomic

MARKER = "prospect-run.json"
# Options that may change when a run is resumed.
RESUMABLE_CHANGES = {
    ("train", "resume"),
    ("train", "overwrite"),
    ("train", "log_every"),
    ("train", "report_to"),
}


class RunDir:
    def __init__(self, config: Config):
        self.cfg = config
        self.path = Path(config.train.output_dir)
        t = config.train
        if t.resume and t.overwrite:
            raise UserError("train.resume and train.overwrite contradict each other; choose one")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"{self.path}: exists and is not a directory; expected a run directory")
        self.exists = self.path.is_dir() and any(self.path.iterdir())
        if self.exists and not (t.resume or t.overwrite):
            raise UserError(
                f"{self.path}: run directory exists; pass --resume to continue it or --overwrite to replace it"
            )
        if self.exists and not (self.path / MARKER).is_file():
            action = "resume" if t.resume else "delete"
            raise UserError(
                f"{self.path}: not a prospect run directory (no {MARKER}); refusing to {action} it"
            )
        if self.exists and t.resume:
            self.check_same_config()

    @property
    def resuming(self) -> bool:
        return self.exists and self.cfg.train.resume

    def check_same_config(self) -> None:
        saved = yaml.safe_load((self.path / "config.yaml").read_text())
        for section, values in self.cfg.to_dict().items():
            if section == "eval":
                continue
            for key, value in values.items():
                old = saved.get(section, {}).get(key)
                if (section, key) not in RESUMABLE_CHANGES and old != value:
                    raise UserError(
                        f"{self.path}: cannot resume with {section}.{key}={value!r}; the run used {old!r}"
                    )

    def create(self) -> None:
        """Called by the main process once data and model have loaded, so bad input never touches a run."""
        if self.resuming:
            return
        if self.exists:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        write_text_atomic(self.path / MARKER, json.dumps({"prospect": __version__, "created": time.time()}))
