"""EngineLoop (pipelines/engine_loop.py): the engine loads and steps on a
thread of its own, with the thread count asked for; concurrent runs each get
their own outputs, the same as LLM.generate; failures reach the runs that wait
on them instead of hanging them. A tiny random Llama (tests/pipelines/conftest)."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from batchlm import LLM, SamplingParams
from batchlm.pipelines.engine_loop import EngineLoop, EngineRequest
from batchlm.pipelines.stages import StepClock

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def prompts(n, seed=0):
    rnd = random.Random(seed)
    return [[rnd.randrange(3, 250) for _ in range(rnd.randrange(2, 40))] for _ in range(n)]


def requests(ps, tag):
    return [EngineRequest(f"{tag}-{i}", p, PARAMS) for i, p in enumerate(ps)]


@pytest.fixture()
def loop(tiny_model):
    seen = {}

    def build():
        seen["load"] = (threading.get_ident(), torch.get_num_threads())
        return LLM(model=tiny_model, dtype="float32")

    loop = EngineLoop(build, threads=1, clock=StepClock())
    loop.seen = seen
    yield loop
    loop.close(timeout=10)


def test_load_and_steps_run_on_the_loops_own_thread(loop):
    load_thread, threads = loop.seen["load"]
    assert load_thread != threading.get_ident() and threads == 1
    engine, step, stepped = loop.llm.engine, loop.llm.engine.step, set()

    def recorded():
        stepped.add((threading.get_ident(), torch.get_num_threads()))
        return step()

    engine.step = recorded
    asyncio.run(loop.run(requests(prompts(3), "a")))
    assert stepped == {(load_thread, 1)}
    assert loop.clock.steps >= 6  # the clock wraps every step


def test_concurrent_runs_get_their_own_outputs_as_generate_would(loop):
    a, b = prompts(12, 1), prompts(9, 2)

    async def both():
        return await asyncio.gather(loop.run(requests(a, "a")), loop.run(requests(b, "b")))

    got_a, got_b = asyncio.run(both())
    assert sorted(got_a) == sorted(f"a-{i}" for i in range(12)) and len(got_b) == 9
    engine = loop.llm.engine
    assert not engine.has_unfinished_requests()
    assert asyncio.run(loop.run([])) == {}
    loop.close()  # the engine's thread ends: the engine is this thread's to use directly
    direct = loop.llm.generate(a + b, PARAMS, use_tqdm=False)
    ours = [got_a[f"a-{i}"] for i in range(12)] + [got_b[f"b-{i}"] for i in range(9)]
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in direct]


def test_idle_time_counts_only_after_a_drain(loop):
    assert loop.take_idle() == 0.0  # no request yet
    asyncio.run(loop.run(requests(prompts(2), "a")))
    threading.Event().wait(0.15)
    assert loop.take_idle() >= 0.15
    assert loop.take_idle() < 0.1  # taken: counted again from the last take


def test_a_refused_request_fails_its_own_run_only(loop):
    class Refused(EngineRequest):
        def add_to(self, engine):
            raise ValueError("refused on purpose")

    async def both():
        return await asyncio.gather(loop.run([*requests(prompts(2), "bad"), Refused("x", [1, 2], PARAMS)]),
                                    loop.run(requests(prompts(4), "ok")), return_exceptions=True)

    bad, ok = asyncio.run(both())
    assert isinstance(bad, ValueError) and "refused on purpose" in str(bad)
    assert sorted(ok) == [f"ok-{i}" for i in range(4)]
    assert len(asyncio.run(loop.run(requests(prompts(2, 5), "after")))) == 2  # the loop still serves
    assert not loop.llm.engine.has_unfinished_requests()  # the refused call's other requests were aborted


def test_a_failed_step_fails_every_waiting_and_later_run(loop):
    def broken():
        raise RuntimeError("step failed on purpose")

    loop.llm.engine.step = broken
    with pytest.raises(RuntimeError, match="on purpose"):
        asyncio.run(loop.run(requests(prompts(2), "a")))
    with pytest.raises(RuntimeError, match="on purpose"):
        asyncio.run(loop.run(requests(prompts(2), "b")))


def test_a_failed_load_is_raised_by_the_constructor(tmp_path):
    with pytest.raises(Exception) as direct:
        LLM(model=str(tmp_path / "no-such-model"))
    with pytest.raises(type(direct.value)):
        EngineLoop(lambda: LLM(model=str(tmp_path / "no-such-model")), threads=1)


def _nice() -> int:
    import os

    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _may_raise_priority() -> bool:
    """Whether this process may lower a thread's nice value (CAP_SYS_NICE), probed on a spare thread."""
    import os

    got = []

    def probe():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
            got.append(True)
        except OSError:
            got.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    return got[0]


@pytest.mark.skipif(not hasattr(__import__("os"), "setpriority"), reason="per-thread priorities: Linux")
def test_engine_thread_runs_at_normal_priority_under_a_niced_worker(tiny_model):
    """Ray starts workers at nice 15; the engine's thread (created by such a thread, so niced too)
    goes back to nice 0 where the process may, and the thread that created it keeps its own."""
    import os

    if not _may_raise_priority():
        pytest.skip("this process may not raise a thread's priority (no CAP_SYS_NICE)")
    seen = {}

    def build():
        seen["nice"] = _nice()
        return LLM(model=tiny_model, dtype="float32")

    def as_a_ray_worker():
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)
        seen["loop"] = EngineLoop(build, threads=1)
        seen["creator"] = _nice()

    t = threading.Thread(target=as_a_ray_worker)
    t.start()
    t.join()
    loop = seen["loop"]
    try:
        assert seen["nice"] == 0 and seen["creator"] == 15
        assert len(asyncio.run(loop.run(requests(prompts(2), "n")))) == 2
    finally:
        loop.close(timeout=10)
