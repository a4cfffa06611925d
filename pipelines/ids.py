"""Row ids: the text the output holds for an id value, and the unique-id check of a plan.

Contract
--------
- `id_text(value) -> str | None`: a row's id as the output holds it.
- `id_texts(values) -> pyarrow large_string array`: the same over a column.
- `check_unique_ids(id_column, scans)`: `scans` are the planned files in
  order, each with `name`, `rows` (rows used) and `ids` (their id_texts);
  raises ConfigError naming the first duplicate values and their rows.
"""
from __future__ import annotations

import bisect
import itertools

from batchlm.pipelines.errors import ConfigError

_SHOWN = 3  # duplicate ids (and rows of each) named in the error


def id_text(value) -> str | None:
    """A row's id as the output holds it: the id column's value as text (None: missing)."""
    return None if value is None else str(value)


def id_texts(values):
    """`id_text` over a whole pyarrow column: a large_string array."""
    import pyarrow as pa

    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        return values.cast(pa.large_string())  # NOTE: the same text str() gives for these types
    return pa.array([id_text(v) for v in values.to_pylist()], pa.large_string())


def check_unique_ids(id_column: str, scans: list) -> None:
    """ConfigError naming the first duplicate ids and their rows, if any id appears twice."""
    import pyarrow as pa
    import pyarrow.compute as pc

    used = [s for s in scans if s.rows]
    if not used:
        return
    ids = pa.concat_arrays([s.ids for s in used])
    counts = pc.value_counts(ids)  # in order of first appearance
    dups = counts.filter(pc.and_(pc.greater(counts.field("counts"), 1), pc.is_valid(counts.field("values"))))
    if not len(dups):
        return
    starts = [0, *itertools.accumulate(s.rows for s in used)]

    def row(i: int) -> str:
        k = bisect.bisect_right(starts, i) - 1
        return f"{used[k].name}#{i - starts[k]}"

    shown = []
    for value in dups.field("values")[:_SHOWN].to_pylist():
        where = pc.indices_nonzero(pc.equal(ids, value)).to_pylist()
        rows = [row(i) for i in where[:_SHOWN]] + (["..."] if len(where) > _SHOWN else [])
        shown.append(f"{value!r} (rows {', '.join(rows)})")
    more = f" and {len(dups) - _SHOWN} more" if len(dups) > _SHOWN else ""
    raise ConfigError(f"input.id_column {id_column!r}: duplicate values: {', '.join(shown)}{more}; "
                      "every row needs a unique id")
