"""The pipeline's two kinds of failure the CLI turns into exit codes.

- ConfigError: the config or the input is wrong (unknown key, wrong type,
  missing file, unreachable endpoint, output written by another config). The
  CLI prints its message alone, no traceback, and exits 2.
- RowFailed: `output.on_error: fail` and a row failed; names the row id. Exit 1.
"""
from __future__ import annotations


class ConfigError(Exception):
    """A problem the person running the job must fix in the config or input."""


class RowFailed(Exception):
    """A row failed and the job was configured to stop at the first failure."""

    def __init__(self, row_id, error: str):
        super().__init__(f"row {row_id!r} failed: {error} (output.on_error: fail)")
        self.row_id = row_id
        self.error = error
