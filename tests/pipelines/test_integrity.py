"""The output's defences, without Ray or a model: damaged and missing shards,
a damaged or missing manifest, changed input, unsafe output locations, the
one-writer lease, `status` telling what it finds. Every case is caused for
real on files in tmp_path, and nothing already committed is ever lost."""
from __future__ import annotations

import json
import os
import socket
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchlm.pipelines.config import parse_config, result_fields
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.lease import LEASE, Lease
from batchlm.pipelines.manifest import MANIFEST, SUCCESS, ShardFooter, encode_shard, read_manifest, shard_name
from batchlm.pipelines.output import Expected, check_location, open_output
from batchlm.pipelines.sources import plan_input
from batchlm.pipelines.status import status
from batchlm.pipelines.storage import Store

from .helpers import cli, tiny_job

UNITS, PER_UNIT = 4, 5


def _input(tmp_path, seed=0):
    src = tmp_path / "in"
    src.mkdir(exist_ok=True)
    n = UNITS * PER_UNIT
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"t{seed}-{i}" for i in range(n)]}),
                   src / "data.parquet")
    return src / "data.parquet"


def _expected(tmp_path, **over):
    cfg = parse_config(tiny_job("m", str(tmp_path / "out"), input={"path": str(tmp_path / "in"), "limit": None,
                                                                     "id_column": "id"}, **over))
    plan = plan_input(cfg.input, PER_UNIT)
    key = json.dumps([(u.name, u.start, u.stop) for u in plan.units])
    return Expected(result_fields(cfg), str(hash(key)), len(plan.units), plan.total_rows, dict(plan.files),
                    tuple(u.name for u in plan.units))


def _commit_all(store, exp, units=range(UNITS)):
    """What the runner's Committer does, for every unit: shard, then manifest; then _SUCCESS."""
    m = open_output(store, exp).manifest
    for u in units:
        table = pa.table({"id": [f"r{u * PER_UNIT + i}" for i in range(PER_UNIT)],
                          "error": pa.array([None] * PER_UNIT, pa.string())})
        footer = ShardFooter(rows=PER_UNIT, config_hash=exp.config_hash, plan=exp.plan, source=exp.source(u))
        w = store.write_atomic(shard_name(u), encode_shard(table, footer, "zstd"))
        m.units[u] = footer.record(w)
        m.save(store)
    store.write_atomic(SUCCESS, b"{}")
    return m


@pytest.fixture
def done(tmp_path):
    _input(tmp_path)
    exp = _expected(tmp_path)
    store = Store(str(tmp_path / "out"))
    store.ensure_root()
    _commit_all(store, exp)
    return store, exp, tmp_path / "out"


def test_truncated_shard_is_moved_aside_reported_and_redone(done):
    store, exp, out = done
    part = out / shard_name(1)
    original = part.read_bytes()
    part.write_bytes(original[: len(original) // 2])
    text, complete = status(str(out))
    assert not complete and f"damaged     {shard_name(1)}: size" in text
    opened = open_output(store, exp)
    assert sorted(opened.manifest.units) == [0, 2, 3]
    assert any(n.startswith(f"{shard_name(1)} is damaged") for n in opened.notes), opened.notes
    assert not part.exists() and not (out / SUCCESS).exists()
    kept = list((out / "_damaged").iterdir())  # moved aside, never deleted
    assert len(kept) == 1 and kept[0].read_bytes() == original[: len(original) // 2]
    assert sorted(read_manifest(store).units) == [0, 2, 3]


def test_same_size_damage_is_caught_by_the_footer(done):
    store, exp, out = done
    part = out / shard_name(2)
    data = bytearray(part.read_bytes())
    data[-10:-4] = b"\0" * 6  # the footer's length field: the size stays the same
    part.write_bytes(bytes(data))
    opened = open_output(store, exp)
    assert 2 not in opened.manifest.units and "unreadable footer" in " ".join(opened.notes)


def test_missing_shard_is_reported_and_success_removed(done):
    store, exp, out = done
    (out / shard_name(3)).unlink()
    text, complete = status(str(out))
    assert not complete and "missing     1 committed shard(s) gone: units 3" in text
    opened = open_output(store, exp)
    assert sorted(opened.manifest.units) == [0, 1, 2] and not (out / SUCCESS).exists()


@pytest.mark.parametrize("damage", ["truncated", "wrong_type", "not_json", "deleted"])
def test_damaged_or_missing_manifest_is_rebuilt_from_shards(done, damage):
    store, exp, out = done
    path = out / MANIFEST
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "wrong_type":
        path.write_text(json.dumps({**json.loads(path.read_text()), "units": ["a", "b"]}))
    elif damage == "not_json":
        path.write_text("[1, 2")
    else:
        path.unlink()
    text, complete = status(str(out))
    assert not complete and "rebuilds it from the 4 shards" in text
    opened = open_output(store, exp)
    assert sorted(opened.manifest.units) == list(range(UNITS))
    assert all(r.size > 0 and len(r.sha256) == 64 for r in opened.manifest.units.values())
    assert opened.notes and ("damaged" in opened.notes[0] or "rebuilding" in opened.notes[0])
    if damage != "deleted":
        assert len(list((out / "_damaged").iterdir())) == 1  # the bad manifest is kept for inspection


def test_missing_manifest_and_shards_of_another_config_are_refused(done, tmp_path):
    store, exp, out = done
    (out / MANIFEST).unlink()
    other = _expected(tmp_path, sampling={"max_tokens": 9})
    with pytest.raises(ConfigError, match="shards of another job"):
        open_output(store, other)
    assert len(list(out.glob("part-*"))) == UNITS  # nothing touched


def test_changed_input_is_refused_with_what_changed(done, tmp_path):
    store, exp, out = done
    time.sleep(0.01)
    _input(tmp_path, seed=1)  # same row count, same names, other rows
    (out / shard_name(1)).unlink()
    changed = _expected(tmp_path)
    assert changed.plan == exp.plan  # names and row ranges alone cannot tell
    with pytest.raises(ConfigError, match=r"different input(.|\n)*data.parquet: ") as e:
        open_output(store, changed)
    assert "--overwrite" in str(e.value)
    assert len(list(out.glob("part-*"))) == UNITS - 1
    opened = open_output(store, changed, overwrite=True)
    assert opened.manifest.units == {}


def test_unsafe_output_locations_are_refused(tmp_path, monkeypatch):
    src = _input(tmp_path)
    with pytest.raises(ConfigError, match="filesystem root"):
        check_location(Store("/"), str(src))
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(ConfigError, match="home directory"):
        check_location(Store("~/"), str(src))
    with pytest.raises(ConfigError, match="holds the input"):
        check_location(Store(str(tmp_path / "in")), str(src))
    with pytest.raises(ConfigError, match="holds the input"):
        check_location(Store(str(tmp_path)), str(tmp_path / "in" / "*.parquet"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty and is not a batchlm output"):
        check_location(Store(str(mine)), str(src))
    (mine / "notes.txt").unlink()
    (mine / shard_name(0)).write_bytes(b"a user's own file")
    with pytest.raises(ConfigError, match="which is not a batchlm shard"):
        check_location(Store(str(mine)), str(src))
    assert (mine / shard_name(0)).read_bytes() == b"a user's own file"


def test_overwrite_and_temp_cleaning_touch_only_batchlm_files(done):
    store, exp, out = done
    (out / ".tmp-user-file").write_text("mine")  # a user's file with a generic temp-like name
    (out / "README.txt").write_text("notes beside the output")
    (out / ".batchlm-tmp-part-000009.parquet-1234abcd").write_bytes(b"half a shard")
    opened = open_output(store, exp, overwrite=True)
    assert opened.manifest.units == {}
    left = sorted(p.name for p in out.iterdir())
    assert left == [".tmp-user-file", "README.txt", MANIFEST]


def test_cli_refuses_root_output_with_its_path(tmp_path):
    src = _input(tmp_path)
    cfg = tmp_path / "c.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(tiny_job("m", "/", input={"path": str(src), "limit": None},
                                            output={"carry": []})))
    p = cli("run", cfg, "--overwrite", timeout=120)
    assert p.returncode == 2 and "output.path: / is the filesystem root" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_lease_refuses_a_second_writer_and_takes_over_stale_ones(tmp_path):
    store = Store(str(tmp_path / "out"))
    store.ensure_root()
    first = Lease(store, ttl=60, interval=0.05)
    assert first.acquire() is None
    with pytest.raises(ConfigError, match=rf"being written by another run \(host {socket.gethostname()}, "
                                          rf"pid {os.getpid()}"):
        Lease(store).acquire()
    time.sleep(0.2)  # heartbeats renew the lease
    assert json.loads(store.read(LEASE))["heartbeat"] > first.started
    first.release()
    assert LEASE not in store.list()

    # a holder on this host whose process is gone: taken over at once
    store.write_atomic(LEASE, json.dumps({"host": socket.gethostname(), "pid": 2**22 + 17,
                                          "heartbeat": time.time()}).encode())
    second = Lease(store)
    assert "its process is gone" in second.acquire()
    second.release()
    # a holder elsewhere: alive until its heartbeat is older than the ttl
    store.write_atomic(LEASE, json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}).encode())
    with pytest.raises(ConfigError, match="host elsewhere"):
        Lease(store, ttl=60).acquire()
    store.write_atomic(LEASE, json.dumps({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 120}).encode())
    third = Lease(store, ttl=60, interval=0.05)
    assert "no heartbeat for 120 s" in third.acquire()
    # another run takes it over while this one is stalled: this one notices and stops committing
    store.write_atomic(LEASE, json.dumps({"host": "elsewhere", "pid": 1, "token": "x",
                                          "heartbeat": time.time()}).encode())
    deadline = time.time() + 5
    while not third.lost and time.time() < deadline:
        time.sleep(0.05)
    with pytest.raises(ConfigError, match="took over this run's lease"):
        third.check()
    third.release()
    assert json.loads(store.read(LEASE))["token"] == "x"  # not ours: left alone
