"""Reading a run's configuration: a YAML recipe (a path, or a name under recipes/), then
`section.key=value` overrides, each value checked against its declaration in prospect/config.py."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from prospect.config import SECTIONS, Config
from prospect.errors import UserError
from prospect.options import build_section, parse_override, plain_value, suggest

MARKER = "prospect-run.json"  # in every run directory (engine/rundir.py), beside the config.yaml it ran with


class UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"'{key}' is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML recipe (or the defaults), apply overrides and validate every value."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        file = resolve_recipe(path)
        source = str(file)
        try:
            raw = yaml.load(file.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{file}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        except UnicodeDecodeError:
            raise UserError(f"{file}: expected UTF-8 text") from None
        if not isinstance(raw, dict):
            raise UserError(f"{file}: expected a mapping of sections (model, data, loss, train, eval)")
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise UserError(f"{source}: section '{section}' must be a mapping")
        raw[section][key] = value

    config = Config(source=source)
    for section, values in raw.items():
        if section == "loss":
            if not isinstance(values, dict):
                raise UserError(f"{source}: section 'loss' must be a mapping with at least 'name'")
            config.loss = {"name": "kto", **{key: plain_value(value) for key, value in values.items()}}
            continue
        if section not in SECTIONS:
            raise UserError(f"{source}: unknown section '{section}'{suggest(section, [*SECTIONS, 'loss'])}")
        if not isinstance(values, dict):
            raise UserError(f"{source}: section '{section}' must be a mapping")
        setattr(config, section, build_section(SECTIONS[section], values, f"{source}: {section}"))
    return config


def resolve_recipe(path: str) -> Path:
    """A recipe path, or the bare name of a file under recipes/ (`kto_vader` -> recipes/kto_vader.yaml)."""
    file = Path(path)
    if file.is_file():
        return file
    if file.is_dir():
        raise UserError(f"{path}: is a directory; expected a YAML recipe file")
    repo_recipes = Path(__file__).resolve().parent.parent / "recipes"
    for candidate in (repo_recipes / path, repo_recipes / f"{path}.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{path}: no such recipe file")


def run_model(given: str) -> str:
    """The model a name stands for: a run directory's final/, anything else unchanged."""
    path = Path(given).expanduser()
    return str(path / "final") if (path / MARKER).is_file() else given


def run_config(run_dir: Path) -> Config:
    """The configuration a run directory was made with (its config.yaml)."""
    if not (run_dir / MARKER).is_file():
        raise UserError(f"{run_dir}: not a prospect run directory (no {MARKER})")
    return load_config(str(run_dir / "config.yaml"))
