"""Read rows from wherever the user keeps feedback: local files, `datasets` directories (saved, or in the hub
layout), the hub, or a built-in corpus. Every row carries its location so later errors can name the file and
line. A source either has named splits (built-ins, the hub, datasets saved with splits) or is all one set
(a file, a dataset saved without splits); splits.py decides what trains and what evaluates."""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prospect.data import film_prompts, tasks, vader
from prospect.data.row import Row
from prospect.errors import UserError, field_error, first_line, where

FILE_TYPES = (".jsonl", ".json", ".parquet", ".csv")
SAVED_DATASET = ("dataset_info.json", "state.json")  # what save_to_disk writes for a dataset with no splits


# Built-in data sets by name: each loader takes a split and returns rows.
BUILTINS: dict[str, Callable[[str], list[Row]]] = {
    **tasks.BUILTINS,
    **vader.BUILTINS,
    **film_prompts.BUILTINS,
}


@dataclass
class Source:
    rows: list[Row]
    split: str | None  # the split the rows are, or None: the source has no splits and these are all its rows


class NoSuchSplit(UserError):
    """A source with splits lacks the one asked for; callers add which option names it."""


def read_rows(spec: str, split: str = "train", subset: str | None = None) -> list[Row]:
    """Rows of a data source: a built-in name, a file, a `datasets` directory or a hub dataset."""
    return read_source(spec, split, subset).rows


def read_source(spec: str, split: str = "train", subset: str | None = None) -> Source:
    """Rows of `split` of a source with splits, or every row of a source without."""
    path = Path(spec)
    if spec in BUILTINS:
        refuse_subset(spec, subset)
        source = Source(BUILTINS[spec](split), split)
    elif path.is_dir():
        source = read_dataset_dir(path, split, subset)
    elif path.is_file():
        refuse_subset(spec, subset)
        source = Source(read_file_once(path), None)
    elif path.suffix.lower() in FILE_TYPES or spec.startswith((".", "/", "~")):
        raise UserError(f"{spec}: no such file")
    else:
        source = read_hub(spec, split, subset)
    if not source.rows:
        raise UserError(f"{spec}: no rows; expected at least one example")
    return source


def has_splits(spec: str) -> bool:
    """Whether a source has named splits, told without reading it."""
    path = Path(spec)
    if path.is_file():
        return False
    if path.is_dir():
        return (path / "dataset_dict.json").is_file() or not any((path / m).is_file() for m in SAVED_DATASET)
    return True  # a built-in or the hub


def refuse_subset(spec: str, subset: str | None) -> None:
    if subset is not None:
        raise UserError(
            f"{spec}: data.subset={subset} names a config of a hub dataset or of a folder in the hub layout; "
            "this source has none"
        )


READ: dict[tuple[str, int, int], list[Row]] = {}


def read_file_once(path: Path) -> list[Row]:
    """`read_file`, remembered while the file is unchanged: a run reads its data for training, for the held-out
    loss and for the evaluation prompts. The rows are shared; readers do not change them."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in READ:
        if len(READ) >= 4:
            READ.pop(next(iter(READ)))
        READ[key] = read_file(path)
    return READ[key]


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
    with open(path, "rb") as handle:
        return jsonl_rows(path, handle)


def jsonl_rows(path: Path, lines: Iterable[bytes]) -> list[Row]:
    """One row per non-blank line of a JSON Lines file."""
    rows = []
    for number, raw in enumerate(lines, start=1):
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
            raise UserError(f"{where(str(path), number)}: expected a JSON object, got {type(value).__name__}")
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
    text = decode(path)
    if is_json_lines(text):  # what datasets' to_json writes unless told lines=False
        return jsonl_rows(path, io.BytesIO(text.encode("utf-8", "surrogatepass")))
    value = parse_json(text, str(path), whole_file=True)
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise UserError(
            f'{path}: expected a JSON list of objects, {{"data": [...]}}, or JSON Lines (one object a line)'
        )
    rows = []
    for index, item in enumerate(value, start=1):
        if not isinstance(item, dict):
            raise UserError(
                f"{where(str(path), row=index)}: expected a JSON object, got {type(item).__name__}"
            )
        rows.append(Row(where(str(path), row=index), item))
    return rows


def is_json_lines(text: str) -> bool:
    """A first line that is a whole JSON object with more text after it."""
    first, _, rest = text.lstrip().partition("\n")
    if not first.startswith("{") or not rest.strip():
        return False
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def read_csv(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(decode(path), newline=""))
    rows = []
    try:
        for record in reader:
            location = where(str(path), reader.line_num)
            if None in record:
                raise UserError(f"{location}: more values than the header has columns")
            rows.append(Row(location, {k: parse_csv_cell(k, v, location) for k, v in record.items()}))
    except csv.Error as exc:
        raise UserError(f"{where(str(path), reader.line_num)}: not valid CSV ({exc})") from None
    return rows


LABEL_TEXT = {"true": True, "false": False, "1": 1, "0": 0}
LIST_COLUMNS = ("ranking", "scores")


def parse_csv_cell(column: str, value: str | None, location: str) -> Any:
    """CSV has no types: true/false and 1/0 in a label column are labels (elsewhere a completion that says
    "True" is text), and conversations are lists, written as JSON or, by datasets' to_csv, as Python reprs
    (read with ast.literal_eval, which evaluates no code)."""
    if value is None:
        return None
    stripped = value.strip()
    if column == "label" and stripped.lower() in LABEL_TEXT:
        return LABEL_TEXT[stripped.lower()]
    if not (stripped.startswith("[{") or (column in LIST_COLUMNS and stripped.startswith("["))):
        return value
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        pass
    try:
        parsed = ast.literal_eval(stripped)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        parsed = None
    if isinstance(parsed, list):
        return parsed
    if column in LIST_COLUMNS or "'role'" in stripped or '"role"' in stripped:
        raise field_error(location, column, "a list written as JSON or as a Python literal", value)
    return value  # text that happens to start with "[{"


def read_parquet(path: Path) -> list[Row]:
    import datasets
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({first_line(exc)})") from None
    features = datasets.Features.from_arrow_schema(table.schema)  # ClassLabels that datasets wrote
    return with_class_names(table.to_pylist(), features, lambda i: where(str(path), row=i))


def read_dataset_dir(path: Path, split: str, subset: str | None) -> Source:
    """A directory written by save_to_disk, or one in the hub layout (data/train-*.parquet, a README with
    configs, or plain data files) that datasets.load_dataset reads."""
    import datasets

    with quiet_datasets():  # local files: no download bars
        if (path / "dataset_dict.json").is_file() or any((path / m).is_file() for m in SAVED_DATASET):
            refuse_subset(str(path), subset)
            return from_datasets(datasets.load_from_disk(str(path)), str(path), split)
        try:
            loaded = datasets.load_dataset(str(path), subset)
        except Exception as exc:  # no data files, an unknown config, a bad file: all user-facing here
            raise UserError(
                f"{path}: is a directory but neither a `datasets` directory (save_to_disk) nor one in the hub "
                f"layout that datasets.load_dataset reads ({first_line(exc)})"
            ) from None
        return from_datasets(loaded, str(path), split)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    import datasets

    was_quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_quiet:
            datasets.enable_progress_bars()


def read_hub(name: str, split: str, subset: str | None) -> Source:
    import datasets

    try:
        loaded = datasets.load_dataset(name, subset)
    except Exception as exc:  # network, missing repo, a config to choose: all user-facing here
        raise UserError(f"{name}: could not load hub dataset ({first_line(exc)})") from None
    return from_datasets(loaded, name, split)


def from_datasets(loaded: Any, name: str, split: str) -> Source:
    """The rows of a `datasets` Dataset (no splits) or of one split of a DatasetDict, class labels named."""
    import datasets

    if not isinstance(loaded, datasets.DatasetDict):
        return Source(with_class_names(list(loaded), loaded.features, lambda i: where(name, row=i)), None)
    if split not in loaded:
        raise NoSuchSplit(f"{name}: no split '{split}'; it has {', '.join(loaded)}")
    table = loaded[split]
    return Source(
        with_class_names(list(table), table.features, lambda i: where(f"{name}[{split}]", row=i)), split
    )


# A `datasets.ClassLabel` label column: its class names, read as desirable (True) or not.
DESIRABLE = ("true", "1", "yes", "desirable", "good", "positive", "chosen")
UNDESIRABLE = ("false", "0", "no", "undesirable", "bad", "negative", "rejected")
LABEL_NAMES = {**dict.fromkeys(DESIRABLE, True), **dict.fromkeys(UNDESIRABLE, False)}


def with_class_names(records: list[dict], features: Any, location: Callable[[int], str]) -> list[Row]:
    """Rows with each ClassLabel column's integers replaced by their class names, and a ClassLabel `label`
    column by booleans read from its names (never from the integers' order: names=["good", "bad"] is common)."""
    import datasets

    classes = {k: f for k, f in (features or {}).items() if isinstance(f, datasets.ClassLabel)}
    for column, feature in classes.items():
        names = [str(n) for n in feature.names]
        if column == "label" and not all(n.lower() in LABEL_NAMES for n in names):
            raise field_error(
                location(1),
                "label",
                "class names that read as desirable or not (true/false, good/bad, ...)",
                names,
            )
        values = [LABEL_NAMES[n.lower()] for n in names] if column == "label" else names
        for record in records:
            index = record.get(column)
            record[column] = values[index] if isinstance(index, int) and 0 <= index < len(values) else None
    return [Row(location(i), record) for i, record in enumerate(records, start=1)]


def decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{where(str(path), line)}: expected UTF-8 text") from None
