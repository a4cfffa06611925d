"""Input sources: the input plan (work units, file identities, unique ids), and one unit's rows.

Contract
--------
- `plan_input(input_cfg, rows_per_unit) -> InputPlan`:
  - `units`: the input as an ordered list of units; unit k is a fixed slice of
    one file (or of the dataset) and is the same on every run over the same
    input, so unit k's shard can be skipped on resume. `limit` keeps the first
    N rows in this order.
  - `files`: every file the plan uses (its name relative to the input path;
    the split name for a Hugging Face dataset) -> its identity, a JSON-able
    dict that changes when the file's rows do: `size` and `mtime` (local) or
    `etag` (object stores; `version_id` too where `fs.info` reports one: a
    single-object path, not a listing); Parquet adds its footer's
    `num_rows`, `num_row_groups`, `created_by` and short hashes of the
    `schema` and of the `row_groups` (statistics, sizes, offsets); JSON Lines
    adds `rows` and a hash of the rows' byte `offsets`; a Hugging Face dataset
    is `fingerprint` and `num_rows`.
  - `total_rows`: the rows of all units.
  Planning reads metadata (Parquet footers, HF dataset info) and scans JSON
  Lines files once for line offsets (up to the limit), so a unit reads just
  its bytes. With `id_column` it also reads that column (Parquet, HF) or
  parses each used line (JSON Lines). It raises ConfigError for: an
  `id_column` or `columns` name that is not a column of a Parquet/HF input;
  an id value shared by two rows anywhere in the plan; JSON Lines records
  separated by a bare \\r (old Mac line endings).
- `plan_units(input_cfg, rows_per_unit) -> list[Unit]`: `plan_input(...).units`.
- `read_unit(input_cfg, unit) -> list[dict]`: the unit's rows, in order, each
  with the key `__id` (the `id_column` value as a string, or "<file>#<row>")
  and, when the row could not be parsed or has no id, `__error`. JSON Lines
  values that are not strings are kept as read (the prompt stage decides what
  it accepts). If the unit's bytes no longer hold its rows (the file changed
  after planning), ConfigError.
- `openai_batch` input (OpenAI Batch API request files) is planned and read
  exactly as JSON Lines; openai_requests.py decides what each line asks.
- JSON Lines has one line rule, used by planning and reading alike (jsonl.py):
  a line ends at \\n (a \\r just before it belongs to the ending); a line of
  whitespace alone is skipped; a bare \\r anywhere else is JSON whitespace
  inside the line, never a line break.
- Problems reaching or reading the input raise ConfigError.

It does not know about prompts, the engine or the output.
"""
from __future__ import annotations

import array
import functools
import hashlib
import io
import itertools
import json
import posixpath
import sys
from dataclasses import asdict, dataclass

from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.ids import check_unique_ids, id_text, id_texts
from batchlm.pipelines.jsonl import lines, parse_row, refuse_cr_separated
from batchlm.pipelines.storage import glob_root, make_fs, store_errors

_SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json", ".ndjson"), "openai_batch": (".jsonl",)}


@dataclass(frozen=True)
class Unit:
    index: int
    file: str  # path inside the filesystem (parquet/jsonl) or the split name (huggingface)
    name: str  # the file's name relative to the input path, used in default ids
    start: int  # first row (position within the file or dataset)
    stop: int  # one past the last row
    byte_start: int = 0  # jsonl only: where row `start` begins
    byte_end: int = 0  # jsonl only: where row `stop` begins (or the last row ends)

    @property
    def num_rows(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputPlan:
    units: list[Unit]
    files: dict[str, dict]  # file name (relative to the input path) or split -> its identity

    @property
    def total_rows(self) -> int:
        return sum(u.num_rows for u in self.units)


@dataclass(frozen=True)
class _Scan:
    """What planning learned about one file (or the Hugging Face split)."""

    file: str
    name: str
    rows: int  # the rows the plan uses (the limit applied)
    identity: dict
    offsets: list[int] | None = None  # jsonl: where each used row begins, then where the last one ends
    ids: object = None  # with id_column: the used rows' ids as text (pyarrow large_string array)


# --- files -------------------------------------------------------------------------------------------


def _files(input_cfg, suffixes: tuple[str, ...]) -> tuple[object, list[tuple[str, str]]]:
    """(fs, [(path, relative name)]) for a file, a directory or a glob, sorted."""
    fs, path = make_fs(input_cfg.path, input_cfg.storage_options)
    with store_errors(f"input {input_cfg.path}"):
        fs.invalidate_cache()  # NOTE: fsspec reuses filesystems: list afresh, identities must be current
        if glob_root(path) != path:
            found = sorted(fs.glob(path))
            base = glob_root(path)
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


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _stat(fs, path: str) -> dict:
    """Size and version of a file: mtime (local) or ETag / VersionId (object stores)."""
    info = fs.info(path)
    keys = {"mtime": "mtime", "ETag": "etag", "VersionId": "version_id"}
    return {"size": info["size"]} | {k: info[src] for src, k in keys.items() if info.get(src) is not None}


def _require_columns(input_cfg, where: str, present: list[str]) -> None:
    """input.columns and input.id_column must name columns of the input."""
    for key, wanted in (("input.columns", input_cfg.columns or []),
                        ("input.id_column", [input_cfg.id_column] if input_cfg.id_column else [])):
        missing = [c for c in wanted if c not in present]
        if missing:
            raise ConfigError(f"{key}: no column(s) {', '.join(map(repr, missing))} in {where}; "
                              f"columns: {', '.join(present)}")


# --- JSON Lines --------------------------------------------------------------------------------------


def _scan_jsonl(fs, path: str, name: str, input_cfg, limit: int) -> _Scan:
    import pyarrow as pa

    id_col = input_cfg.id_column
    offsets, ids, end = [], [], 0
    with fs.open(path, "rb") as f:
        for line in itertools.islice(lines(f), limit):  # NOTE: reads no further than the limit
            if b"\r" in line.raw:
                refuse_cr_separated(name, len(offsets), line.data)
            offsets.append(line.start)
            end = line.end
            if id_col:
                ids.append(id_text(parse_row(line.data).get(id_col)))
    rows, offsets = len(offsets), offsets + [end]
    identity = _stat(fs, path) | {"rows": rows, "offsets": _short_hash(array.array("q", offsets).tobytes())}
    return _Scan(path, name, rows, identity, offsets, pa.array(ids, pa.large_string()) if id_col else None)


def _read_jsonl(fs, unit: Unit) -> list[dict]:
    with fs.open(unit.file, "rb") as f:
        f.seek(unit.byte_start)
        data = f.read(unit.byte_end - unit.byte_start)
    rows = [parse_row(line.data) for line in lines(io.BytesIO(data))]
    if len(rows) != unit.num_rows:
        raise ConfigError(f"input {unit.name}: bytes {unit.byte_start}-{unit.byte_end} now hold {len(rows)} rows, "
                          f"the plan has {unit.num_rows}: the file changed after the run was planned")
    return rows


# --- Parquet -----------------------------------------------------------------------------------------


def _parquet_rows(pf, start: int, stop: int, columns):
    """Rows [start, stop) of an open ParquetFile, reading only the row groups that hold them."""
    groups, first, row = [], start, 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if row + n > start and row < stop:
            if not groups:
                first = row
            groups.append(g)
        row += n
    return pf.read_row_groups(groups, columns=columns).slice(start - first, stop - start)


def _footer_identity(pf) -> dict:
    md = pf.metadata
    groups = [md.row_group(g).to_dict() for g in range(md.num_row_groups)]
    return {"num_rows": md.num_rows, "num_row_groups": md.num_row_groups, "created_by": md.created_by,
            "schema": _short_hash(pf.schema_arrow.serialize().to_pybytes()),
            "row_groups": _short_hash(json.dumps(groups, default=str).encode())}


def _scan_parquet(fs, path: str, name: str, input_cfg, limit: int) -> _Scan:
    import pyarrow.parquet as pq

    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        _require_columns(input_cfg, name, pf.schema_arrow.names)
        rows = min(pf.metadata.num_rows, limit)
        id_col = input_cfg.id_column
        ids = id_texts(_parquet_rows(pf, 0, rows, [id_col]).column(0)) if id_col else None
    return _Scan(path, name, rows, _stat(fs, path) | _footer_identity(pf), ids=ids)


def _read_parquet(fs, unit: Unit, input_cfg, columns) -> list[dict]:
    import pyarrow.parquet as pq

    with fs.open(unit.file, "rb") as f:
        pf = pq.ParquetFile(f)
        _require_columns(input_cfg, unit.name, pf.schema_arrow.names)
        return _parquet_rows(pf, unit.start, unit.stop, columns).to_pylist()


# --- Hugging Face datasets ---------------------------------------------------------------------------


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


def _scan_hf(input_cfg, limit: int) -> _Scan:
    ds = hf_dataset(input_cfg)
    split = str(ds.split or "train")
    _require_columns(input_cfg, f"{input_cfg.path} (split {split})", ds.column_names)
    rows = min(len(ds), limit)
    id_col = input_cfg.id_column
    ids = id_texts(ds.select(range(rows)).with_format("arrow")[id_col]) if id_col else None
    return _Scan(split, split, rows, {"fingerprint": ds._fingerprint, "num_rows": len(ds)}, ids=ids)


# --- the plan ----------------------------------------------------------------------------------------


def _scan_input(input_cfg) -> list[_Scan]:
    """Every file the plan uses, in order, until `limit` rows are reached."""
    limit = input_cfg.limit or sys.maxsize
    if input_cfg.format == "huggingface":
        return [_scan_hf(input_cfg, limit)]
    scan_file = _scan_parquet if input_cfg.format == "parquet" else _scan_jsonl
    fs, files = _files(input_cfg, _SUFFIXES[input_cfg.format])
    scans: list[_Scan] = []
    for path, name in files:
        if limit <= 0:
            break
        with store_errors(f"input {input_cfg.path}"):
            scans.append(scan_file(fs, path, name, input_cfg, limit))
        limit -= scans[-1].rows
    return scans


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def plan_input(input_cfg, rows_per_unit: int) -> InputPlan:
    scans = _scan_input(input_cfg)
    if input_cfg.id_column:
        check_unique_ids(input_cfg.id_column, scans)
    units: list[Unit] = []
    for s in scans:
        for start, stop in _chunks(s.rows, rows_per_unit):
            b0, b1 = (s.offsets[start], s.offsets[stop]) if s.offsets is not None else (0, 0)
            units.append(Unit(len(units), s.file, s.name, start, stop, b0, b1))
    if not units:
        raise ConfigError(f"input {input_cfg.path}: no rows")
    return InputPlan(units, {s.name: s.identity for s in scans})


def plan_units(input_cfg, rows_per_unit: int) -> list[Unit]:
    return plan_input(input_cfg, rows_per_unit).units


# --- reading -----------------------------------------------------------------------------------------


def read_unit(input_cfg, unit: Unit) -> list[dict]:
    columns = input_cfg.columns
    if columns and input_cfg.id_column and input_cfg.id_column not in columns:
        columns = [*columns, input_cfg.id_column]
    with store_errors(f"input {input_cfg.path}"):
        if input_cfg.format == "huggingface":
            ds = hf_dataset(input_cfg).select(range(unit.start, unit.stop))
            rows = (ds.select_columns(columns) if columns else ds).to_list()
        elif input_cfg.format == "parquet":
            rows = _read_parquet(make_fs(input_cfg.path, input_cfg.storage_options)[0], unit, input_cfg, columns)
        else:
            rows = _read_jsonl(make_fs(input_cfg.path, input_cfg.storage_options)[0], unit)
            if columns:
                rows = [{k: r[k] for k in columns if k in r} | {k: r[k] for k in ("__error",) if k in r}
                        for r in rows]
    for i, row in enumerate(rows):
        name_pos = f"{unit.name}#{unit.start + i}"
        if input_cfg.id_column:
            value = id_text(row.get(input_cfg.id_column))
            row["__id"] = value if value is not None else name_pos
            if value is None:
                row.setdefault("__error", f"id column {input_cfg.id_column!r} is missing or null")
        else:
            row["__id"] = name_pos
    return rows
