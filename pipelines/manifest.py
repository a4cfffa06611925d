"""The output directory's bookkeeping: shard names, the manifest, resume state.

Layout of an output root
------------------------
    part-000000.parquet ...   one shard per work unit, committed atomically
    _manifest.json            config hash + result-changing fields, the plan's
                              fingerprint, one record per committed unit, runs
    _SUCCESS                  written last, when every unit is committed

Contract
--------
- A unit is committed iff its shard exists: shards are written whole or not
  at all (Store.write_atomic) and each carries its own record in the Parquet
  footer (key `batchlm`), so the manifest can always be rebuilt from shards.
  The manifest is written after each shard; a shard whose manifest update was
  lost to a crash is adopted from its footer on the next start.
- `open_output(store, fields, plan_fp, total_units, total_rows, overwrite)`:
  cleans temporary files, refuses an output written with other
  result-changing fields (ConfigError listing what differs) or from a
  different input plan, deletes everything with overwrite=True, and returns
  the Manifest with exactly the committed units.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field

from batchlm.pipelines.config import config_hash, diff_fields
from batchlm.pipelines.errors import ConfigError

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
FOOTER_KEY = b"batchlm"
_SHARD = re.compile(r"part-(\d{6})\.parquet$")


def shard_name(unit: int) -> str:
    return f"part-{unit:06d}.parquet"


def shard_unit(name: str) -> int | None:
    m = _SHARD.match(name)
    return int(m.group(1)) if m else None


@dataclass
class UnitRecord:
    rows: int
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class Manifest:
    config_hash: str
    result_config: dict
    plan: str  # fingerprint of the unit list
    total_units: int
    total_rows: int
    units: dict[int, UnitRecord] = field(default_factory=dict)
    runs: list[dict] = field(default_factory=list)
    updated: float = 0.0

    @property
    def rows_done(self) -> int:
        return sum(u.rows for u in self.units.values())

    def totals(self) -> UnitRecord:
        t = UnitRecord(rows=0)
        for u in self.units.values():
            t.rows += u.rows
            t.errors += u.errors
            t.input_tokens += u.input_tokens
            t.output_tokens += u.output_tokens
        return t

    def to_json(self) -> bytes:
        d = asdict(self)
        d["units"] = {str(k): v for k, v in sorted(d["units"].items())}
        d["updated"] = time.time()
        return json.dumps(d, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Manifest":
        d = json.loads(data)
        d["units"] = {int(k): UnitRecord(**v) for k, v in d["units"].items()}
        return cls(**d)

    def save(self, store) -> None:
        store.write_atomic(MANIFEST, self.to_json())


def read_manifest(store) -> Manifest | None:
    names = store.list()
    return Manifest.from_json(store.read(MANIFEST)) if MANIFEST in names else None


def footer_record(store, name: str) -> UnitRecord:
    import pyarrow.parquet as pq

    with store.fs.open(f"{store.root}/{name}", "rb") as f:
        meta = pq.read_metadata(f).metadata or {}
    return UnitRecord(**json.loads(meta[FOOTER_KEY]))


def open_output(store, fields: dict, plan_fp: str, total_units: int, total_rows: int,
                overwrite: bool = False) -> Manifest:
    store.ensure_root()
    store.clean_temp()
    names = store.list()
    ours = [n for n in names if n in (MANIFEST, SUCCESS) or shard_unit(n) is not None]
    if overwrite:
        for n in ours:
            store.delete(n)
        names = []
    fresh = Manifest(config_hash(fields), fields, plan_fp, total_units, total_rows)
    old = Manifest.from_json(store.read(MANIFEST)) if MANIFEST in names else None
    shards = {shard_unit(n): n for n in names if shard_unit(n) is not None}
    if old is None and shards:
        raise ConfigError(f"output {store.url} holds shards but no {MANIFEST}: it was not written by "
                          "this job; choose another output.path or pass --overwrite")
    if old is not None and old.config_hash != fresh.config_hash:
        diff = "\n".join(diff_fields(old.result_config, fields)) or "  (fields differ)"
        raise ConfigError(f"output {store.url} was written with a different config; what differs:\n{diff}\n"
                          "Use another output.path, or --overwrite to discard it.")
    if old is not None and old.plan != plan_fp:
        raise ConfigError(f"output {store.url} was written from a different input ({old.total_units} units, "
                          f"{old.total_rows} rows then; {total_units} units, {total_rows} rows now); "
                          "use another output.path, or --overwrite to discard it.")
    if old is not None:
        fresh.runs = old.runs
    for unit, name in sorted(shards.items()):
        rec = old.units.get(unit) if old else None
        fresh.units[unit] = rec if rec is not None else footer_record(store, name)
    fresh.save(store)
    return fresh


def encode_shard(table, record: UnitRecord, compression: str) -> bytes:
    """Parquet bytes of one shard, its UnitRecord in the footer."""
    import io

    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    meta[FOOTER_KEY] = json.dumps(asdict(record)).encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf,
                   compression=None if compression == "none" else compression)
    return buf.getvalue()
