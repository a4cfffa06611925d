"""Input sources: deterministic work units, and reading one unit's rows.

Contract
--------
- `plan_units(input_cfg, rows_per_unit) -> list[Unit]`: the input as an
  ordered list of units; unit k is a fixed slice of one file (or of the
  dataset) and is the same on every run over the same input, so unit k's
  shard can be skipped on resume. `limit` keeps the first N rows in this
  order. Only metadata is read (Parquet footers, HF dataset info); JSON Lines
  files are scanned once for line offsets, so a unit reads just its bytes.
- `read_unit(input_cfg, unit) -> list[dict]`: the unit's rows, in order, each
  with the key `__id` (the `id_column` value as a string, or "<file>#<row>")
  and, when the
  row could not be parsed, `__error`. JSON Lines values that are not strings
  are kept as read (the prompt stage decides what it accepts).
- Problems reaching or reading the input raise ConfigError.

It does not know about prompts, the engine or the output.
"""
from __future__ import annotations

import functools
import json
import posixpath
from dataclasses import asdict, dataclass

from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.storage import make_fs, store_errors


@dataclass(frozen=True)
class Unit:
    index: int
    file: str  # path inside the filesystem (parquet/jsonl) or the split name (huggingface)
    name: str  # the file's name relative to the input path, used in default ids
    start: int  # first row (position within the file or dataset)
    stop: int  # one past the last row
    byte_start: int = 0  # jsonl only: where row `start` begins
    byte_end: int = 0  # jsonl only: where row `stop` begins

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)


def _files(input_cfg, suffixes: tuple[str, ...]) -> tuple[object, list[tuple[str, str]]]:
    """(fs, [(path, relative name)]) for a file, a directory or a glob, sorted."""
    fs, path = make_fs(input_cfg.path, input_cfg.storage_options)
    with store_errors(f"input {input_cfg.path}"):
        if any(c in path for c in "*?["):
            found = sorted(fs.glob(path))
            base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0]
        elif fs.isdir(path):
            found = sorted(p for p in fs.find(path) if p.endswith(suffixes))
            base = path.rstrip("/")
        elif fs.exists(path):
            found, base = [path], posixpath.dirname(path)
        else:
            raise ConfigError(f"input {input_cfg.path}: no such file or directory")
    found = [f for f in found if not posixpath.basename(f).startswith((".", "_"))]
    if not found:
        raise ConfigError(f"input {input_cfg.path}: no {'/'.join(suffixes)} files found")
    return fs, [(f, posixpath.relpath(f, base) if base else f) for f in found]


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def _jsonl_offsets(fs, path: str) -> list[int]:
    """Byte offset of every non-blank line, plus the file size at the end."""
    offsets, pos = [], 0
    with fs.open(path, "rb") as f:
        for line in f:
            if line.strip():
                offsets.append(pos)
            pos += len(line)
    return offsets + [pos]


@functools.lru_cache(maxsize=4)
def _hf_dataset(path: str, split: str | None, storage_options_json: str):
    import datasets

    opts = json.loads(storage_options_json)
    try:
        ds = datasets.load_from_disk(path, storage_options=opts or None)
    except FileNotFoundError:
        if "://" not in path and posixpath.exists(path):
            raise
        ds = datasets.load_dataset(path, split=split or "train", storage_options=opts or None)
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        pick = split or ("train" if "train" in ds else (names[0] if len(names) == 1 else None))
        if pick not in ds:
            raise ConfigError(f"input {path}: split {split!r} not found; splits: {', '.join(names)}")
        ds = ds[pick]
    elif split not in (None, ds.split and str(ds.split)):
        raise ConfigError(f"input {path}: is a single dataset of split {ds.split}; drop input.split")
    return ds


def hf_dataset(input_cfg):
    with store_errors(f"input {input_cfg.path}"):
        try:
            return _hf_dataset(input_cfg.path, input_cfg.split,
                               json.dumps(input_cfg.storage_options, sort_keys=True))
        except FileNotFoundError:
            raise ConfigError(f"input {input_cfg.path}: no dataset saved there (save_to_disk) "
                              "and no such dataset on the hub") from None


def plan_units(input_cfg, rows_per_unit: int) -> list[Unit]:
    units: list[Unit] = []
    remaining = input_cfg.limit if input_cfg.limit is not None else float("inf")

    def add(file, name, start, stop, offsets=None):
        nonlocal remaining
        stop = int(min(stop, start + remaining))
        if stop <= start:
            return
        remaining -= stop - start
        b0, b1 = (offsets[start], offsets[stop]) if offsets else (0, 0)
        units.append(Unit(len(units), file, name, start, stop, b0, b1))

    fmt = input_cfg.format
    if fmt == "huggingface":
        ds = hf_dataset(input_cfg)
        for start, stop in _chunks(len(ds), rows_per_unit):
            add(str(ds.split or "train"), str(ds.split or "train"), start, stop)
        return units
    fs, files = _files(input_cfg, (".parquet",) if fmt == "parquet" else (".jsonl", ".json", ".ndjson"))
    for path, name in files:
        if remaining <= 0:
            break
        with store_errors(f"input {input_cfg.path}"):
            if fmt == "parquet":
                import pyarrow.parquet as pq

                with fs.open(path, "rb") as f:
                    total, offsets = pq.ParquetFile(f).metadata.num_rows, None
            else:
                offsets = _jsonl_offsets(fs, path)
                total = len(offsets) - 1
        for start, stop in _chunks(total, rows_per_unit):
            add(path, name, start, stop, offsets)
    if not units:
        raise ConfigError(f"input {input_cfg.path}: no rows")
    return units


def _read_parquet(fs, unit: Unit, columns):
    import pyarrow.parquet as pq

    with fs.open(unit.file, "rb") as f:
        pf = pq.ParquetFile(f)
        missing = [c for c in columns or [] if c not in pf.schema_arrow.names]
        if missing:
            raise ConfigError(f"input {unit.name}: no column(s) {', '.join(missing)}; "
                              f"columns: {', '.join(pf.schema_arrow.names)}")
        groups, first, row = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if row + n > unit.start and row < unit.stop:
                groups.append(g)
                first = row if first is None else first
            row += n
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(unit.start - first, unit.num_rows).to_pylist()


def _read_jsonl(fs, unit: Unit):
    with fs.open(unit.file, "rb") as f:
        f.seek(unit.byte_start)
        data = f.read(unit.byte_end - unit.byte_start)
    rows = []
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append(row if isinstance(row, dict) else {"__error": "line is JSON but not an object"})
        except ValueError as e:
            rows.append({"__error": f"invalid JSON: {e}"})
    assert len(rows) == unit.num_rows, f"{unit.name}: expected {unit.num_rows} rows, read {len(rows)}"
    return rows


def read_unit(input_cfg, unit: Unit) -> list[dict]:
    columns = input_cfg.columns
    if columns and input_cfg.id_column and input_cfg.id_column not in columns:
        columns = [*columns, input_cfg.id_column]
    with store_errors(f"input {input_cfg.path}"):
        if input_cfg.format == "huggingface":
            ds = hf_dataset(input_cfg).select(range(unit.start, unit.stop))
            rows = (ds.select_columns(columns) if columns else ds).to_list()
        elif input_cfg.format == "parquet":
            rows = _read_parquet(make_fs(input_cfg.path, input_cfg.storage_options)[0], unit, columns)
        else:
            rows = _read_jsonl(make_fs(input_cfg.path, input_cfg.storage_options)[0], unit)
            if columns:
                rows = [{k: r[k] for k in columns if k in r} | {k: r[k] for k in ("__error",) if k in r}
                        for r in rows]
    for i, row in enumerate(rows):
        pos = unit.start + i
        if input_cfg.id_column:
            value = row.get(input_cfg.id_column)
            row["__id"] = str(value) if value is not None else f"{unit.name}#{pos}"
            if value is None:
                row.setdefault("__error", f"id column {input_cfg.id_column!r} is missing or null")
        else:
            row["__id"] = f"{unit.name}#{pos}"
    return rows
