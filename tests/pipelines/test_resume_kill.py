"""Exactly-once under kill -9: the driver is killed at random moments (one of
them in the middle of a shard write), the same command is rerun each time,
and the final output holds every input id once, no temporary file remains,
and no committed unit was ever generated again (counted from the engine
actors' unit trace, BATCHLM_UNIT_TRACE)."""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from .helpers import CLI, input_ids, read_output, tiny_job, write_yaml
from .procs import kill_driver, start_driver

ROWS, PER_UNIT = 160, 8


def _shards(out: Path) -> dict[str, tuple[int, int]]:
    if not out.exists():
        return {}
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}


def _traced_units(trace: Path) -> set[int]:
    if not trace.exists():
        return set()
    return {json.loads(line)["unit"] for line in trace.read_text().splitlines() if line.strip()}


def _unit(name: str) -> int:
    return int(name[len("part-"):-len(".parquet")])


def _wait(cond, timeout: float, what: str, log: Path):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


@pytest.mark.ray_cluster
def test_kill9_driver_at_random_moments_then_resume(tmp_path, tiny_model):
    seed = int(os.environ.get("BATCHLM_TEST_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(
        tiny_model, str(out), input={"limit": ROWS}, output={"rows_per_shard": PER_UNIT},
        # NOTE: 128 new tokens per row (ignore_eos): with the engine stepping on its own thread 16 tokens
        # finished the whole job between two polls of the shard count, before the kill could land.
        sampling={"max_tokens": 128, "ignore_eos": True}, resources={"batch_size": PER_UNIT}))
    log = tmp_path / "driver.log"
    generations: dict[int, int] = {}
    kills = ["random", "during_shard_write", "random", "random", "random"]
    for k, how in enumerate([*kills, "finish"]):
        before = _shards(out)
        trace = tmp_path / f"trace-{k}.jsonl"
        env = {**os.environ, "BATCHLM_UNIT_TRACE": str(trace)}
        if how == "during_shard_write":
            env["BATCHLM_FAILPOINTS"] = "shard_write=60"
        with open(log, "a") as f:
            f.write(f"\n===== run {k} ({how}), seed {seed}, {len(before)} shards committed =====\n")
        proc = start_driver([*CLI, "run", cfg], env, log)
        if how == "finish":
            assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
        elif how == "during_shard_write":
            _wait(lambda: any(p.name.startswith(".batchlm-tmp-part-") for p in out.glob(".batchlm-tmp-*")), 300,
                  "a shard write", log)
            kill_driver(proc)
            assert list(out.glob(".batchlm-tmp-part-*")), "the kill should leave a half-written temporary shard"
        else:
            # a random moment: from Ray's start-up to after two more shards commit
            target = len(before) + rng.randint(0, 2)
            _wait(lambda: len(_shards(out)) >= target or proc.poll() is not None, 300, f"{target} shards", log)
            time.sleep(rng.uniform(0, 0.3) if target > len(before) else rng.uniform(0, 6))
            kill_driver(proc)
            assert len(_shards(out)) < ROWS // PER_UNIT, "the run finished before the kill; make it longer"
        after = _shards(out)
        # committed shards are never rewritten ...
        assert {n: after.get(n) for n in before} == before, f"seed {seed}: a committed shard changed"
        # ... and their units never generated again.
        again = _traced_units(trace) & {_unit(n) for n in before}
        assert not again, f"seed {seed}, run {k}: committed units generated again: {sorted(again)}"
        for u in _traced_units(trace):
            generations[u] = generations.get(u, 0) + 1

    table = read_output(str(out))
    ids = table["id"].to_pylist()
    assert len(ids) == ROWS and sorted(ids) == sorted(input_ids(ROWS)), f"seed {seed}"
    assert table["error"].null_count == ROWS
    assert not [p for p in out.iterdir() if p.name.startswith(".batchlm-tmp-")], "temporary files left"
    assert (out / "_SUCCESS").exists()
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["units"]) == ROWS // PER_UNIT
    assert set(generations) == set(range(ROWS // PER_UNIT))
