"""The fault battery: real parts, no mocks. A real local Ray (a head on
127.0.0.1 that every driver joins), real SIGKILLs, a real S3 endpoint over
HTTP (moto's ThreadedMotoServer) behind a fault-injecting proxy (faultproxy.py),
real Parquet, the tiny random model. Every job ends with each input id exactly
once, `_SUCCESS`, no temporary file, no `_lease.json`, and nothing committed
lost or generated again (BATCHLM_UNIT_TRACE).

- the proxy forwards byte for byte; the Store retries every kind of fault the
  proxy injects; a conditional PUT whose reply is lost still yields our lease;
  an unreachable endpoint fails in seconds;
- a job with input and output on S3 completes through a faulty proxy;
- an engine actor killed mid-run is restarted and its batch redone in the same run;
- the SIGKILL battery: 50 kills of the driver at random moments, then resume.

A seed (BATCHLM_TEST_SEED, else the clock) drives every random choice and is
named in every assertion message.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import random
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.lease import LEASE, Lease
from batchlm.pipelines.storage import Store

from .faultproxy import KINDS, FaultProxy
from .helpers import CLI, DOCS, free_port, input_ids, read_output, tiny_job, write_yaml
from .procs import kill_driver, start_driver
from .test_resume_kill import _shards, _traced_units, _unit, _wait

SEED = int(os.environ.get("BATCHLM_TEST_SEED", time.time_ns() % 10**6))


def _tail(log: Path, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else "(no log)"


def _stop(proc) -> None:
    """kill -9 a driver and its session unless it has ended (its pid may be reused once reaped)."""
    if proc.returncode is None:
        kill_driver(proc)


def _trace(path: Path) -> list[dict]:
    """The unit trace's whole lines (a line being appended is left for the next read)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def _check_output(out: Path, rows: int, why: str) -> None:
    """Every id once, _SUCCESS, no temporary file, no lease, nothing moved aside."""
    table = read_output(str(out))
    ids = table["id"].to_pylist()
    assert len(ids) == rows and sorted(ids) == sorted(input_ids(rows)), f"{why}: ids not exactly once"
    assert table["error"].null_count == rows, why
    names = {p.name for p in out.iterdir()}
    assert not [n for n in names if n.startswith(".batchlm-tmp-")], f"{why}: temporary files left: {names}"
    assert "_SUCCESS" in names and LEASE not in names and "_damaged" not in names, f"{why}: {sorted(names)}"


# -- a Ray head that every driver joins ------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A local Ray head on 127.0.0.1 (no dashboard) in its own session; yields the drivers' env.
    Stopped by killing its session (never `ray stop`, which stops every Ray on the machine)."""
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = start_driver([ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                         "--include-dashboard=false", f"--ray-client-server-port={free_port()}",
                         f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=2",
                         "--disable-usage-stats"], env, log)
    try:
        _wait(lambda: "Ray runtime started" in _tail(log, 10**6) or head.poll() is not None, 180, "the Ray head",
              log)
        assert head.poll() is None, _tail(log)
        # RAY_AUTH_MODE=token: drivers send the head's token (~/.ray/auth_token)
        yield {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_AUTH_MODE": "token"}
    finally:
        kill_driver(head, grace=0.2)


# -- S3 through the fault-injecting proxy ----------------------------------------------------------

@pytest.fixture(scope="module")
def moto():
    """(moto's port, s3fs straight to it): buckets faults-in (the docs) and faults-out.
    NOTE: moto keeps its state per process, not per server: the buckets are this module's own
    and the state is reset at the end."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                         "AWS_DEFAULT_REGION": "us-east-1"}.items():
                mp.setenv(k, v)
            fs = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", key="testing", secret="testing")
            fs.mkdir("faults-in")
            fs.mkdir("faults-out")
            fs.put(str(DOCS), "faults-in/docs/python_docs.parquet")
            yield port, fs
    finally:
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
        server.stop()


@pytest.fixture
def proxied(moto):
    """(s3fs straight to moto, a fresh proxy in front of it, storage options through the proxy)."""
    port, fs = moto
    with FaultProxy(port, seed=SEED) as proxy:
        yield fs, proxy, {"endpoint_url": proxy.url, "key": "testing", "secret": "testing"}


def test_proxy_forwards_byte_for_byte(proxied):
    fs, proxy, opts = proxied
    store = Store("s3://faults-out/plain", opts)
    data = random.Random(SEED).randbytes(3 << 20)
    written = store.write_atomic("blob.bin", data)
    assert store.read("blob.bin") == data
    info = fs.info("faults-out/plain/blob.bin", refresh=True)  # straight to moto
    assert info["size"] == len(data) and info["ETag"].strip('"') == written.etag
    assert store.entries()["blob.bin"].etag == written.etag
    assert store.create_exclusive("once", b"1") and not store.create_exclusive("once", b"2")
    assert fs.cat_file("faults-out/plain/once") == b"1"
    store.delete("once")
    assert sorted(store.list()) == ["blob.bin"]
    assert proxy.counts["requests"] == proxy.counts["forwarded"] > 5 and proxy.injected() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_store_retries_each_fault_kind(proxied, kind):
    fs, proxy, opts = proxied
    proxy.stall, proxy.stall_long = 0.3, 2.5
    n = itertools.count()
    # three faults in a row, then one through: the most that make_fs's 4 attempts absorb
    proxy.add_rule(kind, lambda r: next(n) % 4 != 0, times=6)
    store = Store(f"s3://faults-out/{kind}", {**opts, "config_kwargs": {"read_timeout": 1}})
    rng = random.Random(SEED)
    for i in range(6):
        data = rng.randbytes(2000)
        store.write_atomic(f"part-{i}", data)
        assert store.read(f"part-{i}") == data, f"seed {SEED}"
        first = store.create_exclusive(f"x-{i}", b"x")
        # NOTE: a lost reply makes a retried create answer "exists" (412) although it was ours: only the
        # bytes tell (the lease compares its token, see the next test)
        assert first or kind in ("drop_after", "stall_long"), f"seed {SEED}: {proxy.faults}"
        assert not store.create_exclusive(f"x-{i}", b"y") and store.read(f"x-{i}") == b"x"
    assert sorted(store.list()) == sorted([f"part-{i}" for i in range(6)] + [f"x-{i}" for i in range(6)])
    assert proxy.counts[kind] == 6, f"seed {SEED}: {proxy.counts}"


@pytest.mark.parametrize("kind", ["drop_after", "stall_long"])
def test_lease_create_whose_reply_is_lost_is_still_ours(proxied, kind):
    """The conditional PUT reaches S3, its reply is lost, the retry gets 412: the lease is still ours."""
    fs, proxy, opts = proxied
    proxy.stall_long = 2.5
    proxy.add_rule(kind, lambda r: r.method == "PUT" and r.path.endswith(f"/{LEASE}") and "if-none-match" in r.headers)
    store = Store("s3://faults-out/lease", {**opts, "config_kwargs": {"read_timeout": 1}})
    lease = Lease(store)
    assert lease.acquire() is None
    assert proxy.counts[kind] == 1, proxy.faults
    assert json.loads(fs.cat_file(f"faults-out/lease/{LEASE}"))["token"] == lease.token
    with pytest.raises(ConfigError, match="being written by another run"):  # and no one else's
        Lease(store).acquire()
    lease.release()
    assert not fs.exists(f"faults-out/lease/{LEASE}")


def test_unreachable_endpoint_fails_in_seconds():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="EndpointConnectionError"):
        Store("s3://faults-out/x", {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k",
                                     "secret": "s"}).ensure_root()
    assert time.monotonic() - t0 < 15


@pytest.mark.ray_cluster
def test_s3_job_through_faulty_proxy(tmp_path, tiny_model, proxied, ray_head):
    fs, proxy, opts = proxied
    rows, per_unit = 64, 8
    opts = {**opts, "config_kwargs": {"read_timeout": 3}}
    proxy.stall, proxy.stall_long = 0.5, 4.5
    # one of each kind where it hurts most, then random ones everywhere (driver and read tasks)
    for kind, match in [
        ("drop_after", lambda r: r.method == "PUT" and r.path.endswith(f"/{LEASE}") and "if-none-match" in r.headers),
        ("stall_long", lambda r: r.method == "PUT" and "/part-" in r.path),
        ("drop", lambda r: r.method == "PUT" and "/part-" in r.path),
        ("503", lambda r: r.method == "PUT" and "/_manifest.json" in r.path),
        ("500", lambda r: r.method == "GET" and "python_docs.parquet" in r.path),
        ("stall", lambda r: r.method == "GET" and "python_docs.parquet" in r.path),
    ]:
        proxy.add_rule(kind, match)
    proxy.set_rate(0.1, 20)
    out = "s3://faults-out/faulty"
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(
        tiny_model, out, input={"path": "s3://faults-in/docs/", "limit": rows, "storage_options": opts},
        output={"rows_per_shard": per_unit, "storage_options": opts}, resources={"batch_size": per_unit},
        sampling={"max_tokens": 8}))
    log = tmp_path / "driver.log"
    proc = start_driver([*CLI, "run", cfg], {**os.environ, **ray_head}, log)
    try:
        rc = proc.wait(timeout=600)
    finally:
        _stop(proc)
    why = f"seed {SEED}, faults {proxy.faults}"
    assert rc == 0, f"{why}\n{_tail(log)}"
    for kind in KINDS:
        assert proxy.counts[kind] >= 1, f"{why}: no {kind} fault happened"
    table = read_output(out, {"endpoint_url": opts["endpoint_url"], "key": "testing", "secret": "testing"})
    assert sorted(table["id"].to_pylist()) == sorted(input_ids(rows)), why
    names = sorted(x.rsplit("/", 1)[-1] for x in fs.ls("faults-out/faulty", refresh=True))
    assert names == sorted(["_SUCCESS", "_manifest.json", *[f"part-{u:06d}.parquet" for u in range(rows // per_unit)]])
    assert fs.call_s3("list_multipart_uploads", Bucket="faults-out").get("Uploads", []) == []


# -- an engine actor killed mid-run ----------------------------------------------------------------

@pytest.mark.ray_cluster
def test_engine_actor_killed_mid_run_is_restarted(tmp_path, tiny_model, ray_head):
    rows, per_unit = 64, 4
    out = tmp_path / "out"
    trace = tmp_path / "trace.jsonl"
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(
        tiny_model, str(out), input={"limit": rows}, output={"rows_per_shard": per_unit},
        resources={"batch_size": per_unit}, sampling={"max_tokens": 96, "ignore_eos": True}))
    log = tmp_path / "driver.log"
    proc = start_driver([*CLI, "run", cfg], {**os.environ, **ray_head, "BATCHLM_UNIT_TRACE": str(trace)}, log)
    try:
        # a unit the actor has just started on and that is not committed: work in flight
        def in_flight():
            lines = _trace(trace)
            fresh = len(lines) >= 3 and not (out / f"part-{lines[-1]['unit']:06d}.parquet").exists()
            return fresh or proc.poll() is not None
        _wait(in_flight, 300, "an engine batch in flight", log)
        assert proc.poll() is None, _tail(log)
        pid = _trace(trace)[-1]["pid"]
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"MapWorker(MapBatches(EngineStage))" in f.read()
        committed = {_unit(n) for n in _shards(out)}
        t_kill = time.time()
        os.kill(pid, signal.SIGKILL)
        rc = proc.wait(timeout=600)
    finally:
        _stop(proc)
    assert rc == 0, _tail(log)
    lines = _trace(trace)
    pre = [x for x in lines if x["t"] < t_kill]
    post = [x for x in lines if x["t"] >= t_kill]
    assert {x["pid"] for x in pre} == {pid} and pid not in {x["pid"] for x in post}, lines
    pre_units, post_units = [x["unit"] for x in pre], [x["unit"] for x in post]
    assert len(set(pre_units)) == len(pre_units) and len(set(post_units)) == len(post_units), lines
    again = set(pre_units) & set(post_units)
    assert again, f"the kill hit no work in flight: {lines}"
    assert not set(post_units) & committed, f"committed units generated again: {set(post_units) & committed}"
    assert set(pre_units) | set(post_units) == set(range(rows // per_unit))
    _check_output(out, rows, "actor kill")


# -- the SIGKILL battery ---------------------------------------------------------------------------

ROWS = 200  # the whole docs file: 200 units of one row
RESERVE = 40  # uncommitted units a killed run must leave, so it can never finish before its kill
PHASES = {
    "early": 10,  # imports, planning (before the lease)
    "opening": 10,  # just after this run's lease appears: lease, open_output, manifest, ray.init
    "ray": 12,  # 0-8 s after the output is opened: ray.init, actor start, read tasks (or the first commit)
    "commit": 15,  # while shards commit: after 1-3 new shards, 0-0.5 s later
    "shard_write": 3,  # in the middle of a shard's temporary file (BATCHLM_FAILPOINTS)
}


def _lease_pid(out: Path) -> int | None:
    try:
        return int(json.loads((out / LEASE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _kill_at(phase: str, proc, out: Path, log: Path, before: dict, rng: random.Random) -> None:
    ended = lambda: proc.poll() is not None  # noqa: E731
    started = lambda: "units already committed" in _tail(log, 10**6)  # noqa: E731 (the line after opening)
    if phase == "early":
        time.sleep(rng.uniform(0.05, 4.0))
    elif phase == "opening":
        _wait(lambda: _lease_pid(out) == proc.pid or started() or ended(), 300, "this run's lease", log)
        time.sleep(rng.uniform(0, 0.5))
    elif phase == "ray":
        _wait(lambda: started() or ended(), 300, "the start of streaming", log)
        deadline = time.monotonic() + rng.uniform(0, 8)
        _wait(lambda: time.monotonic() > deadline or len(_shards(out)) > len(before) or ended(), 300,
              "a moment after Ray start-up", log)
    elif phase == "commit":
        target = len(before) + rng.randint(1, 3)
        _wait(lambda: len(_shards(out)) >= target or ended(), 300, f"{target} shards", log)
        time.sleep(rng.uniform(0, 0.5))
    elif phase == "shard_write":
        _wait(lambda: any(out.glob(".batchlm-tmp-part-*")) or ended(), 300, "a shard write", log)
    assert proc.poll() is None, f"the run ended on its own before its kill:\n{_tail(log)}"
    kill_driver(proc)


@pytest.mark.slow
@pytest.mark.ray_cluster
def test_sigkill_battery(tmp_path, tiny_model, ray_head):
    rng = random.Random(SEED)
    phases = [p for p, n in PHASES.items() for _ in range(n)]
    rng.shuffle(phases)
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(
        tiny_model, str(out), input={"limit": ROWS}, output={"rows_per_shard": 1},
        resources={"batch_size": 4}, sampling={"max_tokens": 8}))
    generations: collections.Counter = collections.Counter()
    stats: collections.Counter = collections.Counter()
    t0 = time.monotonic()
    for k, phase in enumerate([*phases, "finish"]):
        before = _shards(out)
        if phase in ("ray", "commit", "shard_write") and ROWS - len(before) < RESERVE:
            phase = "opening"  # too little work left to let this run commit
        lease_left = (out / LEASE).exists()
        trace, log = tmp_path / f"trace-{k}.jsonl", tmp_path / f"run-{k}.log"
        env = {**os.environ, **ray_head, "BATCHLM_UNIT_TRACE": str(trace)}
        if phase == "shard_write":
            env["BATCHLM_FAILPOINTS"] = "shard_write=60"
        why = f"seed {SEED}, run {k} ({phase}), {len(before)} shards committed before it"
        t_run = time.monotonic()
        proc = start_driver([*CLI, "run", cfg], env, log)
        try:
            if phase == "finish":
                assert proc.wait(timeout=600) == 0, f"{why}:\n{_tail(log)}"
            else:
                _kill_at(phase, proc, out, log, before, rng)
        except AssertionError as e:
            raise AssertionError(f"{why}: {e}") from None
        finally:
            _stop(proc)
        after = _shards(out)
        text = _tail(log, 10**7)
        # committed shards are never rewritten, moved or lost ...
        assert {n: after.get(n) for n in before} == before, f"{why}: a committed shard changed"
        # ... their units are never generated again ...
        again = _traced_units(trace) & {_unit(n) for n in before}
        assert not again, f"{why}: committed units generated again: {sorted(again)}"
        # ... and a killed run's lease never stops the next run.
        assert "being written by another run" not in text, f"{why}:\n{text[-3000:]}"
        if lease_left and "units already committed" in text:  # the line printed once the output is opened
            assert "took over the lease" in text, f"{why}: the dead run's lease was not taken over"
        generations.update(_traced_units(trace))
        stats[phase] += 1
        stats[f"{phase} s"] += round(time.monotonic() - t_run)
        stats["shards committed"] += len(after) - len(before)
        stats["left temp files"] += any(out.glob(".batchlm-tmp-*"))
        stats["left a lease"] += (out / LEASE).exists()
    stats["seconds"] = round(time.monotonic() - t0)
    why = f"seed {SEED}, {dict(stats)}"
    print(f"sigkill battery: {why}")
    assert sum(stats[p] for p in PHASES) == sum(PHASES.values()) >= 50, why
    _check_output(out, ROWS, why)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["units"]) == ROWS, why
    assert set(generations) == set(range(ROWS)), why
