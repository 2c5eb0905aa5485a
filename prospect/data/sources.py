"""Read rows from wherever the user keeps feedback: local files, `datasets` directories, the hub, or a
built-in corpus. Every row carries its location so later errors can name the file and line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prospect.data import tasks, vader
from prospect.data.row import Row
from prospect.errors import UserError, where

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")


# Built-in data sets by name: each loader takes a split and returns rows.
BUILTINS: dict[str, Callable[[str], list[Row]]] = {**tasks.BUILTINS, **vader.BUILTINS}


def read_rows(spec: str, split: str = "train") -> list[Row]:
    """Rows of a data source: a built-in name, a file, a `datasets` directory or a hub dataset."""
    if spec in BUILTINS:
        rows = BUILTINS[spec](split)
    else:
        path = Path(spec)
        if path.is_dir():
            rows = read_dataset_dir(path, split)
        elif path.is_file():
            rows = read_file(path)
        elif path.suffix.lower() in FILE_TYPES or spec.startswith((".", "/", "~")):
            raise UserError(f"{spec}: no such file")
        else:
            rows = read_hub(spec, split)
    if not rows:
        raise UserError(f"{spec}: no rows; expected at least one example")
    return rows


def read_file(path: Path) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".json":
        return read_json(path)
    if suffix == ".csv":
        return read_csv(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise UserError(f"{path}: unsupported file type '{suffix}'; expected one of {', '.join(FILE_TYPES)}")


def read_jsonl(path: Path) -> list[Row]:
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where(str(path), number)}: expected UTF-8 text") from None
            if not text.strip():
                continue
            if len(raw) > MAX_ROW_BYTES:
                raise UserError(
                    f"{where(str(path), number)}: a row of {len(raw) / 2**20:.0f} MB; expected at most "
                    f"{MAX_ROW_BYTES // 2**20} MB per row"
                )
            value = parse_json(text.rstrip("\r\n"), where(str(path), number))
            if not isinstance(value, dict):
                raise UserError(
                    f"{where(str(path), number)}: expected a JSON object, got {type(value).__name__}"
                )
            rows.append(Row(where(str(path), number), value))
    return rows


MAX_ROW_BYTES = 16 * 2**20  # one JSON Lines row; a longer one is a mistake, not an example


def parse_json(text: str, location: str, whole_file: bool = False) -> Any:
    """json.loads with a one-line error naming the place for everything the parser or the text can throw:
    bad syntax, integers past Python's 4,300-digit limit, nesting deeper than the stack, lone surrogates."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        place = f"{location}:{exc.lineno}" if whole_file else location
        raise UserError(f"{place}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except ValueError as exc:  # an integer too long to convert
        raise UserError(f"{location}: not usable JSON ({str(exc).split(';')[0]})") from None
    except RecursionError:
        raise UserError(f"{location}: not usable JSON (nested too deeply)") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UserError(
            f"{location}: text with a lone surrogate ({exc.object[exc.start : exc.end]!a}), not valid Unicode"
        ) from None
    except RecursionError:
        raise UserError(f"{location}: not usable JSON (nested too deeply)") from None
    return value


def read_json(path: Path) -> list[Row]:
    value = parse_json(decode(path), str(path), whole_file=True)
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(f'{path}: expected a JSON list of objects (or {{"data": [...]}})')
    rows = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise UserError(
                f"{where(str(path), row=index)}: expected a JSON object, got {type(item).__name__}"
            )
        rows.append(Row(where(str(path), row=index), item))
    return rows


def read_csv(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(decode(path), newline=""))
    rows = []
    try:
        for record in reader:
            if None in record:
                raise UserError(
                    f"{where(str(path), reader.line_num)}: more values than the header has columns"
                )
            rows.append(
                Row(where(str(path), reader.line_num), {k: parse_csv_cell(k, v) for k, v in record.items()})
            )
    except csv.Error as exc:
        raise UserError(f"{where(str(path), reader.line_num)}: not valid CSV ({exc})") from None
    return rows


BOOLEAN_COLUMNS = ("label",)


def parse_csv_cell(column: str, value: str | None) -> Any:
    """CSV has no types: true/false in a label column are booleans (elsewhere a completion that says "True"
    is text), and JSON lists (conversations) are lists."""
    if value is None:
        return None
    lowered = value.strip().lower()
    if column in BOOLEAN_COLUMNS and lowered in ("true", "false"):
        return lowered == "true"
    if value.lstrip().startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    return [Row(where(str(path), row=i), r) for i, r in enumerate(records, start=1)]


def read_dataset_dir(path: Path, split: str) -> list[Row]:
    import datasets

    if not any(
        (path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        raise UserError(
            f"{path}: is a directory; expected a data file or a `datasets` directory (save_to_disk)"
        )
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path}: no split '{split}'; it has {', '.join(loaded)}")
        loaded = loaded[split]
    return [Row(where(f"{path}[{split}]", row=i), r) for i, r in enumerate(loaded, start=1)]


def read_hub(name: str, split: str) -> list[Row]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing repo, missing split: all user-facing here
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{name}: could not load hub dataset split '{split}' ({message})") from None
    return [Row(where(f"{name}[{split}]", row=i), r) for i, r in enumerate(loaded, start=1)]


def decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{where(str(path), line)}: expected UTF-8 text") from None
