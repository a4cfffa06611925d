"""The output directory's bookkeeping: shard names, records, the manifest.

Layout of an output root
------------------------
    part-000000.parquet ...   one shard per work unit, committed atomically
                              (part-000000.jsonl for output.format openai_batch)
    _record-000000.json ...   a JSON Lines shard's own record, written just before it
    _manifest.json            config hash + result-changing fields, the plan's
                              fingerprint, each input file's identity, one
                              record per committed unit (with the shard's
                              size, sha256 and ETag), runs
    _SUCCESS                  written last, when every unit is committed
    _lease.json               the running writer (pipelines/lease.py)
    _damaged/                 shards and manifests found damaged, moved aside
    .batchlm-tmp-*            a local writer's temporary files

Contract
--------
- A unit is committed iff its shard exists and is intact: shards are written
  whole or not at all (Store.write_atomic) and each carries its own record in
  the Parquet footer (key `batchlm`: rows, errors, tokens, the config hash,
  the plan fingerprint and its input file's identity), so the manifest can always be rebuilt from shards.
  A JSON Lines shard (openai_batch) cannot hold a record without breaking its
  format: its record, with the shard's size and sha256, is `_record-NNNNNN.json`,
  written atomically before the shard (`write_shard`); a shard is trusted only
  with a record that matches it, and a record without its shard means nothing.
- `UnitRecord` is what the manifest keeps of a unit; `ShardFooter` what the
  shard keeps of itself. A file's own size and checksum cannot be inside the
  file, so they live in the manifest only, taken when the shard is written.
- `read_manifest(store) -> Manifest | None` raises ManifestDamaged when the
  file exists but cannot be parsed; the resume policy (output.py) decides.

It does not decide what a resume accepts: see output.py.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field, fields

from batchlm.pipelines.errors import ConfigError

MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
FOOTER_KEY = b"batchlm"
SHARD_SUFFIX = {"parquet": ".parquet", "openai_batch": ".jsonl"}  # output format -> shard file suffix
_SHARD = re.compile(r"part-(\d{6})\.(?:parquet|jsonl)$")
_RECORD = re.compile(r"_record-\d{6}\.json$")


class ManifestDamaged(Exception):
    """_manifest.json exists but is not a manifest this version can read."""


def shard_name(unit: int, fmt: str = "parquet") -> str:
    return f"part-{unit:06d}{SHARD_SUFFIX[fmt]}"


def record_name(unit: int) -> str:
    """A JSON Lines shard's own record (a Parquet shard keeps it in its footer)."""
    return f"_record-{unit:06d}.json"


def is_record(name: str) -> bool:
    return _RECORD.match(name) is not None


def shard_unit(name: str) -> int | None:
    m = _SHARD.match(name)
    return int(m.group(1)) if m else None


@dataclass
class UnitRecord:
    rows: int
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    size: int = 0  # bytes of the shard file; 0 = not recorded
    sha256: str = ""  # of the shard file's bytes, computed while writing
    etag: str = ""  # object stores: the ETag its single PUT returned

    @classmethod
    def from_dict(cls, d: dict) -> "UnitRecord":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ShardFooter:
    """What a shard says of itself (Parquet footer key `batchlm`)."""
    rows: int
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    config_hash: str = ""
    plan: str = ""
    source: dict = field(default_factory=dict)  # identity of the unit's input file

    def record(self, written=None) -> UnitRecord:
        """The manifest's record of this shard; `written` (storage.Written) adds its size, sha256, ETag."""
        rec = UnitRecord(self.rows, self.errors, self.input_tokens, self.output_tokens)
        if written is not None:
            rec.size, rec.sha256, rec.etag = written.size, written.sha256, written.etag
        return rec

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ShardFooter":
        return cls.from_dict(json.loads(raw))

    @classmethod
    def from_dict(cls, d: dict) -> "ShardFooter":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Manifest:
    config_hash: str
    result_config: dict
    plan: str  # fingerprint of the unit list
    total_units: int
    total_rows: int
    inputs: dict[str, dict] = field(default_factory=dict)  # input file -> its identity
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
        try:
            d = json.loads(data)
            d["units"] = {int(k): UnitRecord.from_dict(v) for k, v in d["units"].items()}
            m = cls(**d)
            if not (isinstance(m.config_hash, str) and isinstance(m.plan, str) and isinstance(m.runs, list)
                    and isinstance(m.total_units, int) and isinstance(m.inputs, dict)):
                raise TypeError("a field has the wrong type")
            return m
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ManifestDamaged(f"{type(e).__name__}: {e}") from None

    def save(self, store) -> None:
        store.write_atomic(MANIFEST, self.to_json())


def read_manifest(store, names=None) -> Manifest | None:
    """The manifest, None when there is none; ManifestDamaged when it cannot be read."""
    names = store.list() if names is None else names
    return Manifest.from_json(store.read(MANIFEST)) if MANIFEST in names else None


def read_footer(store, name: str) -> ShardFooter:
    """The shard's own record; raises ValueError when the file is not a whole batchlm shard.

    A Parquet shard: its footer. A JSON Lines shard: its record file, checked
    against the shard's bytes (size, sha256, line count)."""
    try:
        if name.endswith(SHARD_SUFFIX["openai_batch"]):
            return shard_footer(store, name, store.read(name))
        with store.open(name) as f:
            return footer_of(f)
    except (OSError, ConfigError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


def shard_footer(store, name: str, data: bytes) -> ShardFooter:
    """The record of a shard whose whole bytes are `data`, after checking they all decode
    (Parquet) or match the record taken when it was written (JSON Lines); ValueError if not."""
    import io

    if not name.endswith(SHARD_SUFFIX["openai_batch"]):
        import pyarrow.parquet as pq

        footer = footer_of(io.BytesIO(data))
        pq.read_table(io.BytesIO(data))  # the whole file must decode, not just its footer (raises as pyarrow does)
        return footer
    try:
        rec = json.loads(store.read(record_name(shard_unit(name))))
        footer = ShardFooter.from_dict(rec["footer"])
        size, digest = int(rec["size"]), str(rec["sha256"])
    except (ConfigError, ValueError, TypeError, KeyError) as e:
        raise ValueError(f"no readable record {record_name(shard_unit(name))} ({type(e).__name__}: {e})") from None
    if len(data) != size:
        raise ValueError(f"{len(data)} bytes, its record says {size}")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError("its sha256 differs from its record's")
    lines = data.count(b"\n")
    if lines != footer.rows:
        raise ValueError(f"{lines} lines, its record says {footer.rows}")
    return footer


def encode_jsonl_shard(lines: list[str]) -> bytes:
    """JSON Lines bytes of one shard: one line each, each ending in \\n (lines hold no raw newline)."""
    return "".join(line + "\n" for line in lines).encode()


def write_shard(store, unit: int, fmt: str, data: bytes, footer: ShardFooter):
    """Commits one unit's shard bytes atomically; returns storage.Written.

    JSON Lines: the record first (with the shard's size and sha256), then the
    shard, so a shard that exists always has its record."""
    name = shard_name(unit, fmt)
    if fmt != "parquet":
        rec = {"footer": asdict(footer), "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        store.write_atomic(record_name(unit), json.dumps(rec).encode())
    return store.write_atomic(name, data)


def footer_of(f) -> ShardFooter:
    """`read_footer` over an open binary file (or a BytesIO of the shard's bytes)."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(f)
        raw = (meta.metadata or {}).get(FOOTER_KEY)
        if raw is None:
            raise ValueError("no batchlm record in its footer")
        footer = ShardFooter.from_bytes(raw)
    except (OSError, TypeError, KeyError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    except Exception as e:  # pyarrow's ArrowInvalid: not Parquet, truncated footer
        if type(e).__name__ in ("ArrowInvalid", "ArrowIOError", "JSONDecodeError"):
            raise ValueError(str(e)) from None
        raise
    if meta.num_rows != footer.rows:
        raise ValueError(f"footer says {footer.rows} rows, the file holds {meta.num_rows}")
    return footer


def encode_shard(table, footer: ShardFooter, compression: str) -> bytes:
    """Parquet bytes of one shard, its ShardFooter in the footer."""
    import io

    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    meta[FOOTER_KEY] = json.dumps(asdict(footer)).encode()
    buf = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(meta), buf,
                   compression=None if compression == "none" else compression)
    return buf.getvalue()
