"""`batchlm status OUTPUT`: how far a run got, read from the output alone.

Contract: `status(path, storage_options) -> (text, complete)`. Reads the
manifest and lists the shards (the shards are the truth: a unit whose shard
exists is committed even if a crash kept it out of the manifest). Never
writes. A path without a manifest raises ConfigError.
"""
from __future__ import annotations

import datetime

from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.manifest import MANIFEST, SUCCESS, read_manifest, shard_unit
from batchlm.pipelines.storage import TMP_PREFIX, Store


def _when(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def status(path: str, storage_options: dict | None = None) -> tuple[str, bool]:
    store = Store(path, storage_options)
    names = store.list()
    m = read_manifest(store)
    if m is None:
        raise ConfigError(f"{store.where()}: no {MANIFEST}; not a batchlm output (or the run never started)")
    shards = {shard_unit(n) for n in names if shard_unit(n) is not None}
    unrecorded = shards - set(m.units)
    t = m.totals()
    complete = SUCCESS in names and len(shards) == m.total_units
    last = m.runs[-1] if m.runs else {}
    lines = [
        f"output      {store.where()}",
        f"state       {'complete' if complete else 'incomplete'}"
        + ("" if complete else "  (run the same command again to finish)"),
        f"units       {len(shards)}/{m.total_units} committed",
        f"rows        {t.rows}/{m.total_rows} ({100.0 * t.rows / max(1, m.total_rows):.1f}%)",
        f"errors      {t.errors}",
        f"tokens      {t.input_tokens} prompt, {t.output_tokens} output",
        f"config      {m.config_hash} (model {m.result_config.get('model', {}).get('name')}, "
        f"task {m.result_config.get('task', {}).get('type')})",
        f"runs        {len(m.runs)}; last started {_when(last.get('started'))}, "
        f"finished {_when(last.get('finished'))}",
        f"updated     {_when(m.updated)}",
    ]
    if unrecorded:
        lines.append(f"note        {len(unrecorded)} committed shard(s) not yet in the manifest "
                     "(adopted on the next run)")
    temps = [n for n in names if n.startswith(TMP_PREFIX)]
    if temps:
        lines.append(f"note        {len(temps)} temporary file(s) from a killed writer (cleaned on the next run)")
    return "\n".join(lines), complete
