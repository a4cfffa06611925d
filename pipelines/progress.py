"""What the person running the job sees: start-up notes, live progress, the final summary.

Contract
--------
- `Progress(total_rows, done_rows, stream)`: the driver's view of one run.
  - `note(text)`: one `batchlm run: ...` line (what is starting, an engine that is up); on a
    terminal it is printed above the bar.
  - `update(rows, errors, in_tok, out_tok)`: a committed unit, the source of truth; `in_tok` and
    `out_tok` sum this run's committed tokens (the summary's throughput).
  - `live(counts)`: `LiveCounts`, what the engines report while they generate: rows finished
    inside units before their unit commits. Shown figures are the larger of live and committed
    (capped at the total: an engine that Ray restarts reports its retried rows again).
  - `tick()`: called a few times a second from one thread (live.LiveFeed). On a terminal a tqdm
    bar is redrawn once a second; otherwise a plain line, with the time of day, every
    `PLAIN_EVERY` seconds (a log file gets a line at least every 10 s while the run is alive).
  - `close()`: the last line (and the bar finished); nothing is printed after it.
  The line: `rows done/total (pct) | errors | output tok/s | rows/s | ETA`. Rates and the ETA
  start when the first engine is up and count only this run's rows, so Ray start-up, model
  loading and a resumed run's earlier work do not distort them. Before that the line says how
  many engines are up.
- `summary(...) -> str`: the one-screen report printed at the end.
"""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

PLAIN_EVERY = 5.0  # seconds between plain lines when the stream is not a terminal
BAR_EVERY = 1.0  # seconds between redraws of the terminal bar


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


@dataclass(frozen=True)
class LiveCounts:
    """Sums over every engine of this run, as reported while generating."""
    rows: int = 0
    errors: int = 0
    in_tok: int = 0
    out_tok: int = 0
    engines_up: int = 0


class Progress:
    def __init__(self, total_rows: int, done_rows: int = 0, stream=None, engines: int = 1):
        self.total = total_rows
        self.prior = done_rows  # committed before this run
        self.engines = engines
        self.errors = self.rows_this_run = 0
        self.in_tok = self.out_tok = 0  # this run's committed tokens
        # this run's speculative decoding, summed over engines: proposed, accepted, verifications
        self.speculation: dict[str, int] = {}
        self.live_counts = LiveCounts()
        self.t0 = time.monotonic()
        self.t_up: float | None = None  # when the first engine was up: the rates' clock
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._lock = threading.Lock()
        self._last = 0.0
        self._bar = None
        self._closed = False

    # ---- inputs --------------------------------------------------------------------
    def update(self, rows: int, errors: int = 0, in_tok: int = 0, out_tok: int = 0) -> None:
        with self._lock:
            self.rows_this_run += rows
            self.errors += errors
            self.in_tok += in_tok
            self.out_tok += out_tok
            if self.t_up is None:  # no engine report came (a lost sink): rates from the start
                self.t_up = self.t0

    def live(self, counts: LiveCounts) -> None:
        with self._lock:
            self.live_counts = counts
            if counts.engines_up and self.t_up is None:
                self.t_up = time.monotonic()

    @property
    def done(self) -> int:
        return min(self.total, self.prior + max(self.rows_this_run, self.live_counts.rows))

    # ---- output --------------------------------------------------------------------
    def note(self, text: str) -> None:
        with self._lock:
            self._write(f"batchlm run: {text}")

    def line(self) -> str:
        """rows done/total (pct) | errors | output tok/s | rows/s | ETA (or the engines' start-up)."""
        done, live = self.done, self.live_counts
        errors = max(self.errors, live.errors)
        head = f"rows {done}/{self.total} ({100.0 * done / max(1, self.total):.0f}%) | errors {errors}"
        if self.t_up is None:
            return (f"{head} | starting: {live.engines_up}/{self.engines} engine(s) up "
                    f"({time.monotonic() - self.t0:.0f} s)")
        dt = max(1e-9, time.monotonic() - self.t_up)
        rows = max(self.rows_this_run, live.rows)
        rps = rows / dt
        eta = _hms((self.total - done) / rps) if rps > 0 else "?"
        return f"{head} | {max(self.out_tok, live.out_tok) / dt:.1f} tok/s out | {rps:.2f} rows/s | ETA {eta}"

    def tick(self, force: bool = False) -> None:
        with self._lock:
            now = time.monotonic()
            if self._closed or not (force or now - self._last >= (BAR_EVERY if self.tty else PLAIN_EVERY)):
                return
            self._last = now
            self._draw()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._draw()
            self._closed = True
            if self._bar is not None:
                self._bar.close()

    def _draw(self) -> None:
        text = self.line()
        if not self.tty:
            print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.stream, flush=True)
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=text, file=self.stream, dynamic_ncols=True,
                             mininterval=0, bar_format="{desc} |{bar}|", leave=True)
        self._bar.n = self.done
        self._bar.set_description_str(text, refresh=False)
        self._bar.refresh()

    def _write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)


def summary(*, rows: int, total: int, errors: int, error_examples: list[str], in_tok: int, out_tok: int,
            wall: float, generated_rows: int, run_in_tok: int, run_out_tok: int, where: str,
            complete: bool, all_failed: bool = False, speculation: dict | None = None) -> str:
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
    if speculation and speculation.get("verifications"):
        p, a, v = speculation["proposed"], speculation["accepted"], speculation["verifications"]
        lines.insert(-1, f"  speculation     {p} tokens proposed, {a} accepted ({100 * a / max(p, 1):.1f}%), "
                         f"mean acceptance length {1 + a / v:.2f} (this run)")
    if error_examples:
        lines.append("  first errors:")
        lines += [f"    {e}" for e in error_examples[:5]]
    lines.append("=" * 60)
    return "\n".join(lines)
