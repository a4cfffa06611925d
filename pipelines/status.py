"""`batchlm status OUTPUT`: how far a run got, read from the output alone.

Contract: `status(path, storage_options) -> (text, complete)`. Reads the
manifest, lists the shards and checks each one as a resume would (size and
ETag against the record taken at commit, the footer on local disk), so the
shards are the truth: a damaged shard, a recorded shard that is gone, a
damaged manifest and a running writer's lease are each reported. Never
writes. A path with neither a manifest nor shards raises ConfigError.
"""
from __future__ import annotations

import datetime
import json

from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.lease import LEASE
from batchlm.pipelines.manifest import MANIFEST, SUCCESS, ManifestDamaged, read_manifest, shard_unit
from batchlm.pipelines.output import shard_problem
from batchlm.pipelines.storage import DAMAGED_DIR, TMP_PREFIX, Store


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _units(units: list[int]) -> str:
    return ", ".join(map(str, units[:8])) + (", ..." if len(units) > 8 else "")


def status(path: str, storage_options: dict | None = None) -> tuple[str, bool]:
    store = Store(path, storage_options)
    entries = store.entries()
    shards = {shard_unit(n): n for n in entries if shard_unit(n) is not None}
    try:
        m = read_manifest(store, list(entries))
    except ManifestDamaged as e:
        if not shards:
            raise ConfigError(f"{store.where()}: {MANIFEST} is damaged ({e}) and there are no shards") from None
        return (f"output      {store.where()}\nstate       incomplete: {MANIFEST} is damaged ({e}); the next "
                f"run moves it aside and rebuilds it from the {len(shards)} shards' own records"), False
    if m is None:
        if shards:
            return (f"output      {store.where()}\nstate       incomplete: no {MANIFEST}; the next run rebuilds "
                    f"it from the {len(shards)} shards' own records"), False
        raise ConfigError(f"{store.where()}: no {MANIFEST}; not a batchlm output (or the run never started)")
    damaged = {u: p for u, n in shards.items() if u in m.units
               for p in [shard_problem(store, n, entries[n], m.units[u])] if p}
    missing = sorted(set(m.units) - set(shards))
    unrecorded = set(shards) - set(m.units)
    intact = len(shards) - len(damaged)
    t = m.totals()
    complete = SUCCESS in entries and intact == m.total_units and not missing
    last = m.runs[-1] if m.runs else {}
    lines = [
        f"output      {store.where()}",
        f"state       {'complete' if complete else 'incomplete'}"
        + ("" if complete else "  (run the same command again to finish)"),
        f"units       {intact}/{m.total_units} committed and intact",
        f"rows        {t.rows}/{m.total_rows} ({100.0 * t.rows / max(1, m.total_rows):.1f}%)",
        f"errors      {t.errors}",
        f"tokens      {t.input_tokens} prompt, {t.output_tokens} output",
        f"config      {m.config_hash} (model {m.result_config.get('model', {}).get('name')}, "
        f"task {(m.result_config.get('task') or {}).get('type') or m.result_config.get('input', {}).get('format')})",
        f"runs        {len(m.runs)}; last started {_when(last.get('started'))}, "
        f"finished {_when(last.get('finished'))}",
        f"updated     {_when(m.updated)}",
    ]
    for unit, problem in sorted(damaged.items()):
        lines.append(f"damaged     {shards[unit]}: {problem} (the next run moves it to {DAMAGED_DIR}/ and redoes it)")
    if missing:
        lines.append(f"missing     {len(missing)} committed shard(s) gone: units {_units(missing)} "
                     "(the next run redoes them)")
    if unrecorded:
        lines.append(f"note        {len(unrecorded)} committed shard(s) not yet in the manifest "
                     "(adopted on the next run)")
    temps = [n for n in entries if n.startswith(TMP_PREFIX)]
    if temps:
        lines.append(f"note        {len(temps)} temporary file(s) from a killed writer (cleaned on the next run)")
    if LEASE in entries:
        try:
            holder = json.loads(store.read(LEASE))
            lines.append(f"writer      a run holds the lease: host {holder.get('host')}, pid {holder.get('pid')}, "
                         f"last heartbeat {_when(holder.get('heartbeat'))}")
        except (ValueError, ConfigError, AttributeError):
            lines.append(f"writer      {LEASE} present but unreadable")
    return "\n".join(lines), complete
