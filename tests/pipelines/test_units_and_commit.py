"""Fast tests, no Ray and no model: deterministic work units for each input
format, reading a unit's exact rows, atomic writes and temp-file cleanup,
and the output's resume rules (adoption from shard footers, refusals)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from batchlm.pipelines.config import parse_config, result_fields
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.manifest import MANIFEST, ShardFooter, encode_shard, read_manifest, shard_name
from batchlm.pipelines.output import Expected, open_output
from batchlm.pipelines.render import PromptTemplate
from batchlm.pipelines.sources import plan_units, read_unit
from batchlm.pipelines.storage import Store

from .helpers import DOCS, REPO, tiny_job


def _input(**kw):
    return parse_config(tiny_job("m", "o", input=kw)).input


def test_parquet_units_are_fixed_slices_and_read_exactly(tmp_path):
    import pyarrow.parquet as pq

    for i in range(3):  # three files, small row groups, sorted by name
        t = pa.table({"id": [f"f{i}-{j}" for j in range(25)], "text": [f"t{j}" for j in range(25)]})
        pq.write_table(t, tmp_path / f"part{i}.parquet", row_group_size=7)
    inp = _input(path=str(tmp_path), limit=None)
    units = plan_units(inp, 10)
    assert [(u.name, u.start, u.stop) for u in units] == [
        (f"part{i}.parquet", a, b) for i in range(3) for a, b in ((0, 10), (10, 20), (20, 25))]
    assert units == plan_units(inp, 10)  # deterministic
    rows = read_unit(inp, units[4])
    assert [r["id"] for r in rows] == [f"f1-{j}" for j in range(10, 20)]
    assert [r["__id"] for r in rows] == [f"part1.parquet#{j}" for j in range(10, 20)]
    limited = plan_units(_input(path=str(tmp_path / "*.parquet"), limit=33), 10)
    assert sum(u.num_rows for u in limited) == 33 and limited[-1].name == "part1.parquet"


def test_jsonl_units_use_byte_offsets(tmp_path):
    lines = [json.dumps({"id": i, "text": "x" * i}) for i in range(23)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines[:12]) + "\n\n" + "\n".join(lines[12:]) + "\n")
    inp = _input(format="jsonl", path=str(tmp_path / "a.jsonl"), id_column="id", limit=None)
    units = plan_units(inp, 5)
    assert [u.num_rows for u in units] == [5, 5, 5, 5, 3]
    got = [r["__id"] for u in units for r in read_unit(inp, u)]
    assert got == [str(i) for i in range(23)]


def test_missing_input_and_columns_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        plan_units(_input(path=str(tmp_path / "nope.parquet")), 10)
    inp = _input(path=str(DOCS), columns=["nope"])
    with pytest.raises(ConfigError, match="no column"):
        read_unit(inp, plan_units(inp, 10)[0])


def test_template_is_sandboxed():
    cfg = parse_config(tiny_job("m", "o", task={"prompt": "{{ text.__class__.__mro__ }}"}))
    prompt, _, err = PromptTemplate(cfg.task).render({"text": "hi"})
    assert prompt is None and "template error" in err


def test_write_atomic_leaves_no_temp_and_killed_writer_is_cleaned(tmp_path):
    store = Store(str(tmp_path / "out"))
    store.ensure_root()
    store.write_atomic("a.bin", b"x" * 1000)
    assert store.list() == ["a.bin"] and store.read("a.bin") == b"x" * 1000
    # a writer killed in the middle of a shard write leaves only a temp file
    code = ("from batchlm.pipelines.storage import Store; "
            f"Store({str(tmp_path / 'out')!r}).write_atomic('part-000001.parquet', b'y' * 4096)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                            env={**os.environ, "BATCHLM_FAILPOINTS": "shard_write=30"})
    t0 = time.monotonic()
    while not any(n.startswith(".batchlm-tmp-part-000001") for n in store.list()):
        assert time.monotonic() - t0 < 60
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "part-000001.parquet" not in store.list()
    assert store.clean_temp() == 1 and store.list() == ["a.bin"]


def _expected(fields, plan="plan-a", units=3, rows=30) -> Expected:
    return Expected(fields, plan, units, rows, {"data.parquet": {"size": 1}}, ("data.parquet",) * units)


def _shard(store, unit, n, expected):
    table = pa.table({"id": [f"r{unit}-{i}" for i in range(n)], "error": pa.array([None] * n, pa.string())})
    footer = ShardFooter(rows=n, config_hash=expected.config_hash, plan=expected.plan)
    return footer, store.write_atomic(shard_name(unit), encode_shard(table, footer, "zstd"))


def test_open_output_adopts_shards_and_refuses_other_configs(tmp_path):
    store = Store(str(tmp_path / "out"))
    store.ensure_root()
    fields = result_fields(parse_config(tiny_job("m", "o")))
    exp = _expected(fields)
    m = open_output(store, exp).manifest
    footer, written = _shard(store, 0, 10, exp)
    m.units[0] = footer.record(written)
    m.save(store)
    _shard(store, 1, 10, exp)  # committed, then killed before the manifest update
    m = open_output(store, exp).manifest
    assert sorted(m.units) == [0, 1] and m.units[1].rows == 10 and m.units[1].size > 0
    assert sorted(read_manifest(store).units) == [0, 1]

    other = result_fields(parse_config(tiny_job("m", "o", sampling={"temperature": 0.7})))
    with pytest.raises(ConfigError, match=r"sampling.temperature: output has 0.0, this config has 0.7"):
        open_output(store, _expected(other))
    with pytest.raises(ConfigError, match="different input"):
        open_output(store, _expected(fields, "plan-b", 4, 40))
    m = open_output(store, _expected(other), overwrite=True).manifest
    assert m.units == {} and store.list() == [MANIFEST]
