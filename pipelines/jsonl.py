"""The JSON Lines line rule, the only one: planning and reading both split lines here.

Contract
--------
- `lines(f) -> Iterator[Line]` over a binary file: a line ends at \\n (a \\r
  just before it belongs to the ending); a line of whitespace alone is
  skipped; a bare \\r anywhere else is JSON whitespace inside the line, never
  a line break (bytes.splitlines would split there: never use it here).
- `parse_row(data) -> dict`: the line's object, or `{"__error": why}`.
- `refuse_cr_separated(name, row, data)`: ConfigError for records separated by
  a bare \\r (old Mac line endings), which can never be one JSON value.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

from batchlm.pipelines.errors import ConfigError

# NOTE: never valid JSON: a raw \r cannot sit inside a string, so "}<\r>{" is two records on one line.
_CR_SEPARATED = re.compile(rb"\}[ \t]*\r[ \t\r]*\{")


@dataclass(slots=True)
class Line:
    """One JSON Lines line (never blank); slots, not frozen: one is made per input line."""

    start: int  # byte offset of the line in the file
    raw: bytes  # the line as read, its \n included

    @property
    def end(self) -> int:  # just past the line's \n
        return self.start + len(self.raw)

    @property
    def data(self) -> bytes:  # without the ending (\n and the \r before it)
        return self.raw.rstrip(b"\r\n")


def lines(f) -> Iterator[Line]:
    """The JSON Lines rule, the only one (planning and reading both use it): a line ends at \\n
    (a \\r before it is part of the ending); lines of whitespace alone are skipped."""
    offset = 0
    for raw in f:  # NOTE: binary files split on \n only (bytes.splitlines would also split on \r)
        if not raw.isspace():
            yield Line(offset, raw)
        offset += len(raw)


def parse_row(data: bytes) -> dict:
    try:
        row = json.loads(data)
    except ValueError as e:  # UnicodeDecodeError included
        return {"__error": f"invalid JSON: {e}"}
    return row if isinstance(row, dict) else {"__error": "line is JSON but not an object"}


def refuse_cr_separated(name: str, row: int, data: bytes) -> None:
    if _CR_SEPARATED.search(data):
        raise ConfigError(f"input {name}: row {row} holds several records separated by a bare \\r (old Mac line "
                          "endings); JSON Lines ends each line with \\n: convert the file (tr '\\r' '\\n')")
