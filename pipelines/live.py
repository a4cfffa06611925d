"""Live progress: what the engine actors report while a batch is still generating.

Contract
--------
- `ProgressSink`: a small Ray actor (no CPU slot) that the driver starts with `start_sink()`; it
  sums what the engines report: rows finished (with errors and prompt/output tokens),
  engines up (with their model-load time, for the driver's notes), and each engine's
  speculative-decoding totals (the latest per engine process, summed over them).
- `StageReporter(sink)`: lives in an engine actor (`EngineStage`). `engine_up(load_s)` once,
  after the model is loaded; `finished(output)` for each request as the engine finishes it
  (`LLM.generate`/`classify`'s `on_finished`); `rows_failed(n)` for rows that never reached the
  engine. It sends what it gathered at most every `SEND_EVERY` seconds and on `flush()` (the end
  of each engine call), as fire-and-forget calls: a lost message only delays the live figures.
  Given the engine's `SpecStats`, each flush also sends its running totals (cumulative, so a lost
  message loses nothing).
  Without a sink every method is a no-op.
- `LiveFeed(sink, progress)`: one driver thread that asks the sink twice a second and hands the
  sums to `Progress.live`, notes each engine that comes up, and calls `Progress.tick`. `stop()`
  joins it, takes the sink's last sums and kills it; call it before Ray shuts down.

Live figures are for display only: committed units stay the source of truth for the output,
the manifest and the summary.
"""
from __future__ import annotations

import os
import socket
import threading
import time

from batchlm.pipelines.progress import LiveCounts

SEND_EVERY = 0.5  # seconds between reports from an engine actor
POLL_EVERY = 0.5  # seconds between the driver's questions to the sink


class ProgressSink:
    """The sums of this run's live reports (a Ray actor; see start_sink)."""

    def __init__(self):
        self.rows = self.errors = self.in_tok = self.out_tok = 0
        self.engines: list[dict] = []  # {"pid", "host", "load_s"} per engine start, in order
        self.spec: dict[int, dict] = {}  # pid -> that engine's SpecStats.as_dict(), the latest

    def add(self, rows: int, errors: int, in_tok: int, out_tok: int) -> None:
        self.rows += rows
        self.errors += errors
        self.in_tok += in_tok
        self.out_tok += out_tok

    def engine_up(self, pid: int, host: str, load_s: float) -> None:
        self.engines.append({"pid": pid, "host": host, "load_s": load_s})

    def speculation(self, pid: int, totals: dict) -> None:
        self.spec[pid] = totals

    def snapshot(self) -> dict:
        spec = {k: sum(t[k] for t in self.spec.values()) for k in ("proposed", "accepted", "verifications")}
        return {"rows": self.rows, "errors": self.errors, "in_tok": self.in_tok, "out_tok": self.out_tok,
                "engines": list(self.engines), "spec": spec}


def start_sink():
    import ray

    return ray.remote(num_cpus=0, max_restarts=0)(ProgressSink).remote()


class StageReporter:
    """An engine actor's side: gathers finished requests, sends the sums every SEND_EVERY s."""

    def __init__(self, sink=None, spec_stats=None):
        self.sink = sink
        self.spec_stats = spec_stats  # the engine's SpecStats when it speculates
        self._rows = self._errors = self._in_tok = self._out_tok = 0
        self._sent = time.monotonic()
        # finished() runs on the engine's thread, the rest on Ray Data's event loop (engine_loop.py)
        self._lock = threading.Lock()

    @classmethod
    def of(cls, llm, sink=None) -> StageReporter:
        """The reporter of an engine actor's LLM (with its SpecStats when it speculates)."""
        engine = llm.engine
        return cls(sink, engine.spec_stats if engine.spec_config is not None else None)

    def engine_up(self, load_s: float) -> None:
        if self.sink is not None:
            self.sink.engine_up.remote(os.getpid(), socket.gethostname(), round(load_s, 1))

    def finished(self, output) -> None:
        """Per finished request (RequestOutput, or classify's scoring output)."""
        out_tok = sum(len(c.token_ids) for c in getattr(output, "outputs", ()))
        with self._lock:
            self._rows += 1
            self._errors += output.error is not None
            self._in_tok += len(output.prompt_token_ids or ())
            self._out_tok += out_tok
            due = time.monotonic() - self._sent >= SEND_EVERY
        if due:
            self.flush()

    def rows_failed(self, n: int) -> None:
        with self._lock:
            self._rows += n
            self._errors += n

    def failed_after_finish(self, n: int) -> None:
        """Rows already counted as finished whose output turned out unusable (extract: no parse)."""
        with self._lock:
            self._errors += n

    def flush(self) -> None:
        with self._lock:
            self._sent = time.monotonic()
            sums = (self._rows, self._errors, self._in_tok, self._out_tok)
            self._rows = self._errors = self._in_tok = self._out_tok = 0
        if self.sink is None:
            return
        if self.spec_stats is not None and self.spec_stats.verifications:
            self.sink.speculation.remote(os.getpid(), self.spec_stats.as_dict())
        if sums[0] or sums[1]:
            self.sink.add.remote(*sums)


class LiveFeed:
    """The driver's thread: sink -> Progress, twice a second."""

    def __init__(self, sink, progress):
        self.sink, self.progress = sink, progress
        self._stop = threading.Event()
        self._seen = 0
        self._thread = threading.Thread(target=self._loop, name="batchlm-progress", daemon=True)

    def start(self) -> LiveFeed:
        self._thread.start()
        return self

    def _loop(self) -> None:
        import ray

        asked = None  # the sink's answer on its way; ticks never wait for it
        while not self._stop.wait(POLL_EVERY):
            try:
                if asked is None:
                    asked = self.sink.snapshot.remote()
                if ray.wait([asked], timeout=0)[0]:
                    snap, asked = ray.get(asked), None
                    self._take(snap)
            except Exception:  # a lost sink never stops the run or its line: the committed figures remain
                asked = None
            self.progress.tick()

    def _take(self, snap: dict) -> None:
        engines = snap.pop("engines")
        self.progress.speculation = snap.pop("spec")
        for e in engines[self._seen:]:
            self._seen += 1
            self.progress.note(f"engine {self._seen} up on {e['host']} (pid {e['pid']}): "
                               f"model loaded in {e['load_s']:.1f} s")
        self.progress.live(LiveCounts(**snap, engines_up=len(engines)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        try:
            import ray

            self._take(ray.get(self.sink.snapshot.remote(), timeout=5))  # what came since the last poll
            ray.kill(self.sink)
        except Exception:  # already gone with Ray
            pass
