"""The run directory: never overwritten silently, resumable only with the config it was started with.

`--overwrite` loses nothing until the new run has made a step: the old directory is set aside when the new
one is created (after every input has loaded), deleted once the first step is done, and put back if the
new run fails before that. Only what prospect wrote is deleted; anything else found in it is moved into the
new run directory. An output directory that holds an input, or sits inside one, is refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

import yaml

from prospect import __version__
from prospect.config import SECTIONS, Config
from prospect.errors import UserError
from prospect.io import write_text_atomic
from prospect.recipe import MARKER

log = logging.getLogger(__name__)
# What prospect writes in a run directory (trainer, online rounds, best-of-N).
WRITTEN = (
    MARKER,
    "config.yaml",
    "metrics.jsonl",
    "checkpoints",
    "final",
    "eval_before.json",
    "eval_after.json",
    "report.json",
    "report.html",
    "rounds.jsonl",
    "round-*",
    "samples.jsonl",
    "kept.jsonl",
    "sft",
    ".final.*",
    "best",
    ".best.*",
    "evals.jsonl",
)
# Options that may change when a run is resumed.
RESUMABLE_CHANGES = {
    ("train", "resume"),
    ("train", "overwrite"),
    ("train", "log_every"),
    ("train", "report_to"),
    ("train", "push_to_hub"),
    ("loop", "judge_key_env"),  # where the key is kept, not which judge: keys rotate
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
        self.check_inputs()
        # A run set aside by an --overwrite whose new run never finished a step (killed before it could be
        # put back): it is the last complete run, so it stays until a new run has a step.
        self.set_aside: Path | None = self.path.with_name(f".{self.path.name}.replaced")
        if not self.set_aside.is_dir():
            self.set_aside = None

    def announce(self, report: bool) -> str:
        """The first line a run prints, before anything slow: where it writes, and where its report will be
        (`report`: the evaluation writes one)."""
        e = self.cfg.eval
        done = (
            f"; report: {self.path / 'report.json'} when done"
            if report and e.num_prompts and e.before
            else ""
        )
        return f"{'resuming' if self.resuming else 'run directory'} {self.path}{done}"

    @property
    def resuming(self) -> bool:
        return self.exists and self.cfg.train.resume

    def check_same_config(self) -> None:
        saved = yaml.safe_load((self.path / "config.yaml").read_text())
        for section, values in self.cfg.to_dict().items():
            if section == "eval":
                continue
            # An option the run's config lacks was added by a later prospect: the run had its default.
            defaults = dataclasses.asdict(SECTIONS[section]()) if section in SECTIONS else {}
            for key, value in values.items():
                old = saved.get(section, {}).get(key, defaults.get(key))
                if (section, key) not in RESUMABLE_CHANGES and old != value:
                    raise UserError(
                        f"{self.path}: cannot resume with {section}.{key}={value!r}; the run used {old!r}"
                    )

    def check_inputs(self) -> None:
        """Refuse an output directory that holds an input (it would be deleted) or sits inside one."""
        c = self.cfg
        inputs = {
            "model.name": c.model.name,
            "data.train": c.data.train,
            "data.eval": c.data.eval,
            "train.reference_model": c.train.reference_model,
            "online.reward_model": c.online.reward_model,
            "loop.constitution": c.loop.constitution,
        }
        out = self.path.resolve()
        for option, value in inputs.items():
            if not value or not Path(value).expanduser().exists():
                continue
            used = Path(value).expanduser().resolve()
            if used == out or out in used.parents or used in out.parents:
                relation = "is inside" if used in out.parents else "holds"
                raise UserError(
                    f"{self.path}: the output directory {relation} the input {option}={value}; "
                    "choose another train.output_dir"
                )

    def create(self) -> None:
        """Called by the main process once every input has loaded, so bad input never touches a run. An
        existing run being overwritten is set aside, not deleted (see `settle` and `abandon`)."""
        if self.resuming:
            return
        if self.exists and self.set_aside is not None:  # the current directory never finished a step
            shutil.rmtree(self.path)
        elif self.exists:
            self.set_aside = self.path.with_name(f".{self.path.name}.replaced")
            os.rename(self.path, self.set_aside)
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        write_text_atomic(self.path / MARKER, json.dumps({"prospect": __version__, "created": time.time()}))

    def settle(self) -> None:
        """The new run has made progress: delete what prospect wrote in the run it replaced, and move anything
        else the user kept there into the new directory."""
        old, self.set_aside = self.set_aside, None
        if old is None or not old.is_dir():
            return
        for entry in sorted(old.iterdir()):
            if any(entry.match(pattern) for pattern in WRITTEN):
                continue
            target = self.path / entry.name
            if target.exists():
                log.warning("%s: kept as it is; %s already exists", entry, target)
                return
            os.rename(entry, target)
        shutil.rmtree(old)

    def abandon(self) -> None:
        """The new run failed before its first step: remove it, and put back the run it was replacing."""
        if self.resuming:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        if self.set_aside is not None and self.set_aside.is_dir():
            os.rename(self.set_aside, self.path)
        self.set_aside = None
