"""The pipeline's kinds of failure the CLI turns into exit codes.

- ConfigError: the config or the input is wrong (unknown key, wrong type,
  missing file, unreachable endpoint, output written by another config). The
  CLI prints its message alone, no traceback, and exits 2.
- RowFailed: `output.on_error: fail` and a row failed; names the row id. Exit 1.
- StageFailed: a Ray Data stage raised; names the root exception and the units not committed. Exit 1.
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


class StageFailed(Exception):
    """A stage raised (a bug, a device or storage failure) and Ray Data gave up: one line naming the
    root exception and the units not committed yet. Exit 1; committed units are kept."""

    def __init__(self, units: list[int], cause: BaseException):
        shown = ", ".join(map(str, units[:5])) + (f" and {len(units) - 5} more" if len(units) > 5 else "")
        super().__init__(f"the run failed with units {shown} not committed: {describe(cause)}; committed "
                         "units are kept, run the same command again to resume (--verbose shows Ray's own lines)")
        self.units = units


def describe(e: BaseException) -> str:
    """`Type: message` of the innermost exception of a chain: Ray's `.cause` (the remote exception)
    or Python's `__cause__`, skipping the empty marker Ray Data chains onto its own errors. When
    that exception's message is a remote traceback (an actor that died in its constructor), the
    traceback's last line, which names the remote exception."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None)
        if not isinstance(inner, BaseException):
            inner = e.__cause__ if e.__cause__ is not None and str(e.__cause__) else None
        if inner is None:
            break
        e = inner
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if len(lines) > 1 else f"{type(e).__name__}: {lines[0] if lines else ''}"
