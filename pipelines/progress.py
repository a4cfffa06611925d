"""What the person running the job sees: a progress line and the final summary.

Contract
--------
- `Progress(total_rows, done_rows, stream)`: `update(rows, errors, in_tok,
  out_tok)` after each committed unit; prints `rows done/total (pct), errors,
  output tokens/s, rows/s, ETA` at most once a second (rewriting one line on
  a terminal, one line per update otherwise). Rates count only this run's
  work, so a resumed run's ETA is honest.
- `summary(...) -> str`: the one-screen report printed at the end.
"""
from __future__ import annotations

import sys
import time


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total_rows: int, done_rows: int = 0, stream=None, min_interval: float = 1.0):
        self.total = total_rows
        self.done = done_rows
        self.errors = 0
        self.in_tok = self.out_tok = self.rows_this_run = 0
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.min_interval = min_interval
        self._last = 0.0

    def line(self) -> str:
        dt = max(1e-9, time.monotonic() - self.t0)
        rps = self.rows_this_run / dt
        eta = (self.total - self.done) / rps if rps > 0 else float("nan")
        pct = 100.0 * self.done / max(1, self.total)
        eta_s = _hms(eta) if eta == eta else "?"
        return (f"rows {self.done}/{self.total} ({pct:.0f}%) | errors {self.errors} | "
                f"{self.out_tok / dt:.1f} tok/s out | {rps:.2f} rows/s | ETA {eta_s}")

    def update(self, rows: int, errors: int = 0, in_tok: int = 0, out_tok: int = 0, force: bool = False):
        self.done += rows
        self.rows_this_run += rows
        self.errors += errors
        self.in_tok += in_tok
        self.out_tok += out_tok
        now = time.monotonic()
        if force or now - self._last >= self.min_interval or self.done >= self.total:
            self._last = now
            end = "" if self.tty and self.done < self.total else "\n"
            print(("\r" if self.tty else "") + self.line(), end=end, file=self.stream, flush=True)


def summary(*, rows: int, total: int, errors: int, error_examples: list[str], in_tok: int, out_tok: int,
            wall: float, generated_rows: int, run_in_tok: int, run_out_tok: int, where: str,
            complete: bool, all_failed: bool = False) -> str:
    """Counts are of the whole output; rates of this run's work over this run's wall time."""
    lines = [
        "=" * 60,
        f"batchlm run: {'complete' if complete else 'INCOMPLETE'}"
        + (" (every row failed; see the first errors below, fix them, rerun with --overwrite)" if all_failed else ""),
        f"  rows            {rows}/{total} ({generated_rows} generated in this run)",
        f"  errors          {errors}",
        f"  prompt tokens   {in_tok}",
        f"  output tokens   {out_tok}",
        f"  wall time       {_hms(wall)} ({wall:.1f} s)",
        f"  throughput      {run_out_tok / max(wall, 1e-9):.1f} output tok/s, "
        f"{(run_in_tok + run_out_tok) / max(wall, 1e-9):.1f} total tok/s, "
        f"{generated_rows / max(wall, 1e-9):.2f} rows/s (this run)",
        f"  output          {where}",
    ]
    if error_examples:
        lines.append("  first errors:")
        lines += [f"    {e}" for e in error_examples[:5]]
    lines.append("=" * 60)
    return "\n".join(lines)
