"""Opening an output for a run: where it may be, what is already done, what is damaged.

Contract
--------
- `check_location(store, input_path)` runs before anything is
  written. Refused (ConfigError): the filesystem root, the home directory
  itself, an S3 bucket root, a directory that holds the input, and a
  non-empty directory that is not a batchlm output (with `--overwrite` too:
  overwrite discards batchlm's own files, never anyone else's), and, with no
  manifest, files named like shards none of which is a batchlm shard (with
  at least one real shard, the others are damaged shards: moved aside).
- `open_output(store, expected, overwrite) -> Opened(manifest, notes)`:
  1. with overwrite, batchlm's own files are deleted (never `_damaged/`);
  2. temporary files of a killed writer are removed;
  3. the manifest is read; a damaged one is moved to `_damaged/` and, like a
     missing one, rebuilt from the shards' own footers;
  4. an output with committed shards written with other result-changing
     fields, or from changed input (each input file's identity: size,
     mtime/ETag, Parquet footer), is refused with the list of what differs;
  5. every shard is checked cheaply: its size and ETag (one listing) against
     the record taken when it was written and, on local disk, its footer. A
     JSON Lines shard (openai_batch) is checked against its `_record-NNNNNN.json`
     (size and sha256: on local disk the whole shard is hashed). A
     damaged shard is moved to `_damaged/` (never deleted), named in the
     notes, and its unit is redone; a shard missing from the manifest is
     adopted from its footer; a recorded unit whose shard is gone is dropped;
  6. `_SUCCESS` is removed when the output is not complete; the manifest,
     holding exactly the intact committed units, is saved and returned.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from batchlm.pipelines.config import config_hash, diff_fields
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.lease import LEASE
from batchlm.pipelines.manifest import (MANIFEST, SUCCESS, Manifest, ManifestDamaged, UnitRecord, is_record,
                                        read_footer, read_manifest, shard_footer, shard_unit)
from batchlm.pipelines.storage import DAMAGED_DIR, TMP_PREFIX, Entry, Written, glob_root, normalize_path


@dataclass(frozen=True)
class Expected:
    """What this run writes, from the config and the input plan."""
    fields: dict  # result-changing config fields
    plan: str  # fingerprint of the unit list
    total_units: int
    total_rows: int
    inputs: dict[str, dict]  # input file name -> identity
    unit_inputs: tuple[str, ...] = ()  # unit index -> its input file name
    shard_format: str = "parquet"  # output.format: parquet, or openai_batch (JSON Lines shards)

    @property
    def config_hash(self) -> str:
        return config_hash(self.fields)

    def source(self, unit: int) -> dict:
        return self.inputs.get(self.unit_inputs[unit], {}) if unit < len(self.unit_inputs) else {}


@dataclass
class Opened:
    manifest: Manifest
    notes: list[str] = field(default_factory=list)  # what was found and done, one line each


def is_ours(name: str) -> bool:
    return (name in (MANIFEST, SUCCESS, LEASE, DAMAGED_DIR) or name.startswith(TMP_PREFIX)
            or shard_unit(name) is not None or is_record(name))


def _contains(outer: str, inner: str) -> bool:
    outer = outer.rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def check_location(store, input_path: str | None) -> None:
    where = store.url
    if store.local:
        if where == "/":
            raise ConfigError("output.path: / is the filesystem root; choose a directory of its own")
        if where == os.path.realpath(os.path.expanduser("~")) or where == os.path.expanduser("~"):
            raise ConfigError(f"output.path: {where} is the home directory; choose a directory of its own")
    elif "/" not in store.root.strip("/"):
        raise ConfigError(f"output.path: {where} is a bucket root; add a prefix (s3://bucket/some/dir)")
    source = glob_root(normalize_path(input_path)) if input_path else ""
    if source and ("://" in source or os.path.exists(source)) and _contains(where, source):
        raise ConfigError(f"output.path: {where} holds the input {input_path}; choose another directory")
    entries = store.entries()
    foreign = [n for n in entries if not is_ours(n)]
    if foreign and not any(n == MANIFEST or shard_unit(n) is not None for n in entries):
        raise ConfigError(f"output.path: {where} is not empty and is not a batchlm output "
                          f"(it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                          "choose an empty or new directory")
    shards = [n for n in entries if shard_unit(n) is not None]
    if MANIFEST not in entries and shards and not any(_is_batchlm_shard(store, n) for n in shards):
        raise ConfigError(f"output.path: {where} holds {shards[0]}, which is not a batchlm shard, and no "
                          f"{MANIFEST}; choose an empty or new directory")


def _is_batchlm_shard(store, name: str) -> bool:
    try:
        read_footer(store, name)
        return True
    except ValueError:
        return False


def _discard(store, entries: dict[str, Entry]) -> None:
    for name in entries:
        if name in (MANIFEST, SUCCESS) or shard_unit(name) is not None or is_record(name):
            store.delete(name)


def _load_manifest(store, names, notes: list[str]) -> Manifest | None:
    try:
        return read_manifest(store, names)
    except ManifestDamaged as e:
        moved = store.move_aside(MANIFEST)
        notes.append(f"{MANIFEST} was damaged ({e}); moved to {moved}; rebuilt from the shards' own records")
        return None


def _check_config(old: Manifest, expected: Expected, where: str) -> None:
    if old.config_hash != expected.config_hash:
        diff = "\n".join(diff_fields(old.result_config, expected.fields)) or "  (fields differ)"
        raise ConfigError(f"output {where} was written with a different config; what differs:\n{diff}\n"
                          "Use another output.path, or --overwrite to discard it.")


def input_changes(old: dict[str, dict], new: dict[str, dict]) -> list[str]:
    """One line per input file that was added, removed or changed since the output was started."""
    lines = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a is None:
            lines.append(f"  {name}: new file")
        elif b is None:
            lines.append(f"  {name}: gone")
        elif a != b:
            keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            lines.append(f"  {name}: " + ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys))
    return lines


def _check_input(old: Manifest, expected: Expected, where: str) -> None:
    changed = input_changes(old.inputs, expected.inputs) if old.inputs else []
    if old.plan != expected.plan or changed:
        head = (f"output {where} was written from different input ({old.total_units} units, {old.total_rows} "
                f"rows then; {expected.total_units} units, {expected.total_rows} rows now)")
        raise ConfigError(head + (":\n" + "\n".join(changed) if changed else "") +
                          "\nUse another output.path, or --overwrite to start over.")


def shard_problem(store, name: str, entry: Entry, rec: UnitRecord) -> str | None:
    """Why a recorded shard is not intact, or None. Cheap: the listing, and the footer on local disk."""
    if rec.size and entry.size != rec.size:
        return f"size {entry.size} bytes, {rec.size} when it was written"
    if rec.etag and entry.etag and entry.etag != rec.etag:
        return f"ETag {entry.etag}, {rec.etag} when it was written"
    if store.local or not (rec.size and rec.etag):
        try:
            footer = read_footer(store, name)
        except ValueError as e:
            return f"unreadable footer ({e})"
        if footer.rows != rec.rows:
            return f"{footer.rows} rows, {rec.rows} when it was written"
    return None


_FOREIGN = "written by a different config or input plan"


def _adopt(store, name: str, entry: Entry, unit: int, expected: Expected) -> tuple[UnitRecord | None, str | None]:
    """(record, None) for an intact shard of this job that the manifest lacks, or (None, why not)."""
    import hashlib

    try:
        data = store.read(name)
        footer = shard_footer(store, name, data)  # the whole file must decode, not just its footer
    except Exception as e:  # any failure to read it back makes it damaged
        return None, f"unreadable ({type(e).__name__}: {e})"
    if footer.config_hash != expected.config_hash or footer.plan != expected.plan:
        return None, _FOREIGN
    if footer.source and expected.source(unit) and footer.source != expected.source(unit):
        return None, "written from a different version of its input file"
    return footer.record(Written(len(data), hashlib.sha256(data).hexdigest(), entry.etag)), None


def open_output(store, expected: Expected, overwrite: bool = False) -> Opened:
    notes: list[str] = []
    entries = store.entries()
    if overwrite:
        _discard(store, entries)
        entries = store.entries()
    temps = store.clean_temp(entries)
    if temps:
        notes.append(f"removed {temps} temporary file(s) left by a killed writer")
    old = _load_manifest(store, list(entries), notes)
    shards = {shard_unit(n): n for n in entries if shard_unit(n) is not None}
    if old is not None and shards:
        _check_config(old, expected, store.url)
        _check_input(old, expected, store.url)
    elif old is None and shards and MANIFEST not in entries:
        notes.append(f"no {MANIFEST}; rebuilding it from {len(shards)} shard(s)' own records")
    manifest = Manifest(expected.config_hash, expected.fields, expected.plan, expected.total_units,
                        expected.total_rows, dict(expected.inputs))
    if old is not None:
        manifest.runs = old.runs
    checked: dict[int, tuple[UnitRecord | None, str | None]] = {}
    for unit, name in sorted(shards.items()):
        rec = old.units.get(unit) if old else None
        if unit >= expected.total_units:
            checked[unit] = None, f"unit {unit} is past the plan's {expected.total_units} units"
        elif rec is not None:
            checked[unit] = rec, shard_problem(store, name, entries[name], rec)
        else:
            checked[unit] = _adopt(store, name, entries[name], unit, expected)
    if old is None and shards and all(p == _FOREIGN for _, p in checked.values()):
        raise ConfigError(f"output {store.url} holds shards of another job and no {MANIFEST}; "
                          "use another output.path, or --overwrite to discard them")
    for unit, (rec, problem) in checked.items():
        if problem:
            moved = store.move_aside(shards[unit])
            notes.append(f"{shards[unit]} is damaged: {problem}; moved to {moved}; unit {unit} will be "
                         "generated again")
        else:
            manifest.units[unit] = rec
    if old is not None:
        gone = sorted(set(old.units) - set(manifest.units) - set(shards))
        if gone:
            notes.append(f"{len(gone)} committed shard(s) missing ({', '.join(map(str, gone[:5]))}"
                         f"{', ...' if len(gone) > 5 else ''}); their units will be generated again")
    if SUCCESS in entries and len(manifest.units) < expected.total_units:
        store.delete(SUCCESS)
    manifest.save(store)
    return Opened(manifest, notes)

