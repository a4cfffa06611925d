"""An engine on a thread of its own, fed by Ray Data's event loop.

Contract
--------
`EngineLoop(build, threads, clock)` starts one thread, which runs at nice 0
where the process may raise it (`normal_priority`: Ray starts workers at nice
15), sets torch's thread count, calls `build()` (-> a `batchlm.LLM`) and then serves requests
until `close()`. The constructor returns once the model is loaded and raises
what `build` raised. `await loop.run(requests)` hands it a list of
`EngineRequest`s and returns their finished outputs by request id once all of
them are done; several `run`s may wait at once (Ray Data runs several calls
of an async UDF together), and the engine steps whenever any request is
unfinished, so the next batch's requests join before the last ones finish.
`on_finished(output)` (optional) is called on the engine's thread for each
finished request, as it finishes. Every torch operation of the engine (the
model load, request set-up, each step) runs on that one thread, and while it
runs nothing else may touch the engine (it would step another thread's
requests); `close()` ends the thread and hands the engine back to the
caller (the tests compare with `LLM.generate` that way).

If a step raises, every waiting `run` raises it and so does any later one
(the engine's state is then unknown); a request the engine refuses to add
fails its own `run` only (the requests of that run already added are
aborted, as `LLM.generate` does). Requests the engine reports unfinished-but-gone fail their `run`
with a RuntimeError instead of waiting forever.

`EngineLoopStage` is the base of the Ray Data UDFs that own one (stages.EngineStage,
openai_responses.BatchEngineStage): `_start_engine(engine_kwargs, threads,
progress_sink, clock)` loads `LLM(**engine_kwargs)` on a new loop and wires its
live progress (`self.engine`, `self.llm`, `self.report`); the loop's thread ends
with the stage.

NOTE: why a thread of its own. OpenMP (libgomp) keeps one worker team per
thread that opens parallel regions. Ray Data constructs a UDF on the actor's
main thread and calls an async `__call__` from its event-loop thread; loading
the model on the first and stepping on the second gave the process two
teams on a 2-core machine, and its workers stopped spin-waiting. Measured on
a 2-core Xeon (tiny random model, 3000 rows, 8 new tokens, 2 torch threads,
2026-11-26): stepping on the thread that ran the load 11.9 s; stepping from
a second thread after a 2-thread load 29.5 s (1 thread: 18.0 s); load and
steps on one new thread 13.2-14.6 s. `bench pipeline --tiny-model --rows
8000 --max-tokens 8`: steady state 40% -> 73% of bare `LLM.generate`.
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class EngineRequest:
    """One prompt for the engine: generated with `params`, or (classify) its `label_ids` scored."""
    request_id: str
    prompt_ids: list[int]
    params: Any = None  # SamplingParams
    label_ids: list[list[int]] | None = None

    def add_to(self, engine) -> None:
        if self.label_ids is not None:
            engine.add_score_request(self.request_id, self.prompt_ids, self.label_ids)
        else:
            engine.add_request(self.request_id, self.prompt_ids, self.params)


@dataclass(eq=False)  # compared and hashed by identity
class _Call:
    """One `run`: its requests, the outputs so far, and the future its coroutine awaits."""
    requests: list[EngineRequest]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    outputs: dict[str, Any] = field(default_factory=dict)
    failed: bool = False

    def finish(self, output) -> None:
        self.outputs[output.request_id] = output
        if not self.failed and len(self.outputs) == len(self.requests):
            self.loop.call_soon_threadsafe(_resolve, self.future, self.outputs, None)

    def fail(self, error: BaseException) -> None:
        if not self.failed:
            self.failed = True
            self.loop.call_soon_threadsafe(_resolve, self.future, None, error)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():  # its coroutine was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_STOP = object()


def normal_priority() -> bool:
    """Run the calling thread at nice 0 if it runs at a lower priority and the process may raise it
    (Linux: per thread; raising needs CAP_SYS_NICE, e.g. root in a container). True if it now does.

    NOTE: Ray starts its workers at nice 15 (RAY_worker_niceness), the driver, raylet and GCS at 0. On
    a 2-core machine the engine's thread then gave way to the driver's Ray Data executor and commits:
    `bench pipeline --tiny-model --rows 20000 --max-tokens 8` (1 engine thread, 2026-11-26) measured
    steps of 33.3-33.5 ms in the actor (30.5-30.7 ms of CPU) against 27.3-29.2 in the bare process.
    """
    if not hasattr(os, "setpriority"):
        return False
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) > 0:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        return os.getpriority(os.PRIO_PROCESS, tid) <= 0
    except OSError:  # not allowed: the engine runs at the priority it was given
        return False


class EngineLoop:
    def __init__(self, build: Callable[[], Any], threads: int | None = None, clock=None,
                 on_finished: Callable[[Any], None] | None = None):
        self.llm = None
        self.clock = clock  # a StepClock around engine.step, or None
        self.on_finished = on_finished
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self._error: BaseException | None = None  # the load's or a step's: every later run raises it
        self._lock = threading.Lock()
        self._idle_s = 0.0  # seconds the engine sat drained, since take_idle()
        self._idle_since: float | None = None  # when it last drained (ran out of requests), while it waits
        self._thread = threading.Thread(target=self._main, args=(build, threads), name="batchlm-engine",
                                        daemon=True)
        self._thread.start()
        self._ready.wait()
        if self.llm is None:
            raise self._error

    async def run(self, requests: list[EngineRequest]) -> dict[str, Any]:
        """The finished output of every request, by request id."""
        if self._error is not None:
            raise self._error
        if not requests:
            return {}
        loop = asyncio.get_running_loop()
        call = _Call(list(requests), loop, loop.create_future())
        self._inbox.put(call)
        return await call.future

    def take_idle(self) -> float:
        """Seconds the engine sat drained (every request it had finished, none new yet) since the
        last call; 0.0 before its first request."""
        with self._lock:
            now = time.monotonic()
            idle, self._idle_s = self._idle_s, 0.0
            if self._idle_since is not None:
                idle, self._idle_since = idle + now - self._idle_since, now
        return idle

    def close(self, timeout: float | None = None) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    # ---- the engine's thread ----------------------------------------------------------
    def _main(self, build, threads) -> None:
        normal_priority()  # before the load: torch's worker threads, started by this one, inherit it
        try:
            if threads:
                import torch

                torch.set_num_threads(threads)
            self.llm = build()
        except BaseException as e:  # raised again by the constructor
            self._error = e
        finally:
            self._ready.set()
        if self.llm is not None:
            self._serve(self.llm.engine)

    def _serve(self, engine) -> None:
        waiting: dict[str, _Call] = {}  # request id -> its call
        step = (lambda: engine.step()) if self.clock is None else (lambda: self.clock.step(engine.step))
        while True:
            calls = []
            if not engine.has_unfinished_requests():
                calls.append(self._inbox.get())  # nothing to step: wait for work
                with self._lock:
                    if self._idle_since is not None:
                        self._idle_s += time.monotonic() - self._idle_since
                        self._idle_since = None
            while True:
                try:
                    calls.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for call in calls:
                if call is _STOP:
                    return
                self._add(engine, call, waiting)
            if not engine.has_unfinished_requests():
                if waiting:  # never expected: fail their calls rather than let them wait forever
                    lost = RuntimeError(f"the engine lost {len(waiting)} requests")
                    for c in set(waiting.values()):
                        c.fail(lost)
                    waiting.clear()
                continue
            try:
                for out in step():
                    call = waiting.pop(out.request_id, None)
                    if call is None or call.failed:
                        continue
                    if self.on_finished is not None:
                        self.on_finished(out)
                    call.finish(out)
                if not engine.has_unfinished_requests():
                    with self._lock:
                        self._idle_since = time.monotonic()  # drained
            except BaseException as e:
                self._error = e
                for c in set(waiting.values()):
                    c.fail(e)
                self._refuse(e)
                return

    def _add(self, engine, call: _Call, waiting: dict[str, _Call]) -> None:
        """Adds a call's requests; if the engine refuses one, the call fails and its requests already
        added are aborted (as LLM.generate does: nothing of the call runs)."""
        added = []
        for r in call.requests:
            try:
                r.add_to(engine)
            except Exception as e:
                for rid in added:
                    engine.abort_request(rid)
                    waiting.pop(rid, None)
                call.fail(e)
                return
            added.append(r.request_id)
            waiting[r.request_id] = call

    def _refuse(self, error: BaseException) -> None:
        """After a failed step: every call still queued or yet to come fails with its error."""
        while True:
            call = self._inbox.get()
            if call is _STOP:
                return
            call.fail(error)


class EngineLoopStage:
    """The part every engine UDF shares: its engine loop, its LLM and its live-progress reporter."""

    engine: EngineLoop | None = None

    def _start_engine(self, engine_kwargs: dict, threads: int | None, progress_sink=None, clock=None) -> None:
        from batchlm.pipelines.live import StageReporter

        t0 = time.monotonic()

        def build():
            from batchlm import LLM

            return LLM(**engine_kwargs)

        self.engine = EngineLoop(build, threads, clock)
        self.llm = self.engine.llm
        self.report = StageReporter.of(self.llm, progress_sink)  # live progress to the driver (live.py)
        self.engine.on_finished = self.report.finished  # called on the engine's thread, per finished row
        self.report.engine_up(time.monotonic() - t0)

    def __del__(self):  # the loop's thread holds the engine (and the loop): end it with the stage
        if self.engine is not None:
            self.engine.close(timeout=0)
