"""Fast tests, no Ray and no model: the input plan (sources.plan_input) on real
files: units and total rows, each used file's identity (and that it changes
when the rows do), duplicate ids refused across files, id_column and columns
checked against the input while planning, and planning cost (each file opened
once, JSON Lines scanned only up to the limit)."""
from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchlm.pipelines import sources
from batchlm.pipelines.config import parse_config
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.sources import InputPlan, plan_input, plan_units, read_unit

from .helpers import cli, free_port, tiny_job, write_yaml


def _input(**kw):
    return parse_config(tiny_job("m", "o", input={"limit": None, **kw})).input


def _parquet(path, ids, row_group_size=4):
    pq.write_table(pa.table({"id": ids, "text": [f"text of {i}" for i in ids]}), path, row_group_size=row_group_size)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _footer(identity: dict) -> dict:
    return {k: v for k, v in identity.items() if k != "mtime"}


def test_plan_has_units_total_rows_and_the_used_files_identities(tmp_path):
    for i in range(3):
        _parquet(tmp_path / f"part{i}.parquet", [f"f{i}-{j}" for j in range(10)])
    inp = _input(path=str(tmp_path), limit=15, id_column="id")
    plan = plan_input(inp, 4)
    assert isinstance(plan, InputPlan)
    assert plan.total_rows == 15 and plan.units == plan_units(inp, 4)
    assert [(u.name, u.start, u.stop) for u in plan.units] == [
        ("part0.parquet", 0, 4), ("part0.parquet", 4, 8), ("part0.parquet", 8, 10), ("part1.parquet", 0, 4),
        ("part1.parquet", 4, 5)]
    assert list(plan.files) == ["part0.parquet", "part1.parquet"]  # part2 is past the limit
    ident = plan.files["part0.parquet"]
    assert ident["size"] == os.path.getsize(tmp_path / "part0.parquet")
    assert ident["mtime"] == os.stat(tmp_path / "part0.parquet").st_mtime
    assert ident["num_rows"] == 10 and ident["num_row_groups"] == 3 and "parquet-cpp" in ident["created_by"]
    assert len(ident["schema"]) == len(ident["row_groups"]) == 16
    assert json.loads(json.dumps(plan.files)) == plan.files  # JSON-able, as the manifest stores it
    assert plan_input(inp, 4) == plan  # the same input gives the same plan


def test_parquet_identity_changes_when_rows_change_at_the_same_size_and_count(tmp_path):
    path = tmp_path / "data.parquet"
    inp = _input(path=str(path))

    def identity(ids):
        _parquet(path, ids)
        os.utime(path, (1_700_000_000, 1_700_000_000))  # same mtime: only the footer can tell them apart
        return plan_input(inp, 100).files["data.parquet"]

    first = identity([f"a{i:02d}" for i in range(10)])
    again = identity([f"a{i:02d}" for i in range(10)])
    changed = identity([f"b{i:02d}" for i in range(10)])
    assert first == again  # rewriting the same rows gives the same identity
    assert changed["size"] == first["size"] and changed["num_rows"] == first["num_rows"]
    assert changed != first and changed["row_groups"] != first["row_groups"]
    pq.write_table(pa.table({"id": [f"a{i:02d}" for i in range(10)], "body": ["x"] * 10}), path)
    assert plan_input(inp, 100).files["data.parquet"]["schema"] != first["schema"]


def test_s3_identity_is_size_etag_and_version_id(tmp_path, monkeypatch):
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("batchlm-plan")
        boto3.client("s3", endpoint_url=opts["endpoint_url"]).put_bucket_versioning(
            Bucket="batchlm-plan", VersioningConfiguration={"Status": "Enabled"})
        idents = []
        for ids in (["a", "b"], ["c", "d"]):
            _parquet(tmp_path / "data.parquet", ids)
            fs.put(str(tmp_path / "data.parquet"), "batchlm-plan/data/data.parquet")
            idents.append([plan_input(_input(path=path, storage_options=opts), 10).files["data.parquet"]
                           for path in ("s3://batchlm-plan/data/", "s3://batchlm-plan/data/data.parquet")])
        (listed, single), (listed2, single2) = idents
        assert "mtime" not in listed and listed["etag"] != listed2["etag"]  # a listing: size and ETag
        assert single["version_id"] != single2["version_id"] and single["etag"] == listed["etag"]  # one object: HEAD
    finally:
        server.stop()


def test_jsonl_identity_holds_size_rows_and_a_hash_of_the_row_offsets(tmp_path):
    path = tmp_path / "rows.jsonl"
    inp = _input(format="jsonl", path=str(path))
    path.write_text('{"t": "aa"}\n{"t": "b"}\n')
    first = plan_input(inp, 10).files["rows.jsonl"]
    assert set(first) == {"size", "mtime", "rows", "offsets"} and first["rows"] == 2
    path.write_text('{"t": "a"}\n{"t": "bb"}\n')  # same size and rows, the second row starts elsewhere
    second = plan_input(inp, 10).files["rows.jsonl"]
    assert second["size"] == first["size"] and second["offsets"] != first["offsets"]


def test_huggingface_identity_is_the_fingerprint_and_num_rows(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"doc": ["d0", "d1", "d2"], "body": ["x", "y", "z"]}).save_to_disk(
        str(tmp_path / "hf"))
    plan = plan_input(_input(format="huggingface", path=str(tmp_path / "hf"), id_column="doc"), 2)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert plan.files == {"train": {"fingerprint": ds._fingerprint, "num_rows": 3}}
    assert plan.total_rows == 3


def test_duplicate_parquet_ids_across_files_are_refused_with_their_rows(tmp_path):
    _parquet(tmp_path / "a.parquet", ["x0", "dup", "x2", "x3", "twice", "x5"], row_group_size=2)
    _parquet(tmp_path / "b.parquet", ["y0", "dup", "twice", "y3", "dup"], row_group_size=2)
    with pytest.raises(ConfigError) as e:
        plan_input(_input(path=str(tmp_path), id_column="id"), 4)
    msg = str(e.value)
    assert msg == ("input.id_column 'id': duplicate values: 'dup' (rows a.parquet#1, b.parquet#1, b.parquet#4), "
                   "'twice' (rows a.parquet#4, b.parquet#2); every row needs a unique id")
    # the limit ends the plan before the second file: no duplicates left
    assert plan_input(_input(path=str(tmp_path), id_column="id", limit=6), 4).total_rows == 6


def test_many_duplicates_are_summarized_in_one_line(tmp_path):
    _parquet(tmp_path / "a.parquet", [i % 5 for i in range(50)])  # int ids: compared as text, like the output
    with pytest.raises(ConfigError) as e:
        plan_input(_input(path=str(tmp_path / "a.parquet"), id_column="id"), 10)
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("input.id_column 'id': duplicate values: '0' (rows a.parquet#0, a.parquet#5, "
                                   "a.parquet#10, ...), '1' (rows a.parquet#1, ")
    assert "and 2 more; every row needs a unique id" in str(e.value)


def test_duplicate_jsonl_ids_are_refused_and_rows_without_an_id_stay_row_errors(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"id": 1, "t": "x"}, {"t": "no id"}, {"id": "2", "t": "y"}])
    _jsonl(tmp_path / "b.jsonl", [{"t": "no id either"}, {"id": 3, "t": "z"}])
    inp = _input(format="jsonl", path=str(tmp_path), id_column="id")
    plan = plan_input(inp, 10)  # two rows lack the id: not duplicates of each other
    rows = [r for u in plan.units for r in read_unit(inp, u)]
    assert [r["__id"] for r in rows] == ["1", "a.jsonl#1", "2", "b.jsonl#0", "3"]
    assert "missing or null" in rows[1]["__error"] and "__error" not in rows[0]
    _jsonl(tmp_path / "b.jsonl", [{"id": "1", "t": "same text id as a.jsonl's int 1"}])
    with pytest.raises(ConfigError, match=r"duplicate values: '1' \(rows a.jsonl#0, b.jsonl#0\)"):
        plan_input(inp, 10)


def test_duplicate_huggingface_ids_are_refused(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"doc": ["d0", "d1", "d0"], "body": ["x", "y", "z"]}).save_to_disk(
        str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"duplicate values: 'd0' \(rows train#0, train#2\)"):
        plan_input(_input(format="huggingface", path=str(tmp_path / "hf"), id_column="doc"), 2)


@pytest.mark.parametrize("key", ["id_column", "columns"])
def test_unknown_columns_are_refused_while_planning(tmp_path, key):
    import datasets

    _parquet(tmp_path / "a.parquet", ["a", "b"])
    datasets.Dataset.from_dict({"doc": ["d0"], "body": ["x"]}).save_to_disk(str(tmp_path / "hf"))
    def value(present):
        return "nope" if key == "id_column" else [present, "nope"]

    with pytest.raises(ConfigError) as e:
        plan_input(_input(path=str(tmp_path / "a.parquet"), **{key: value("text")}), 10)
    assert str(e.value) == f"input.{key}: no column(s) 'nope' in a.parquet; columns: id, text"
    with pytest.raises(ConfigError, match=rf"input.{key}: no column\(s\) 'nope' in .*hf \(split train\); "
                                          "columns: doc, body"):
        plan_input(_input(format="huggingface", path=str(tmp_path / "hf"), **{key: value("body")}), 10)


def test_a_duplicate_id_stops_the_cli_with_one_line_and_exit_2(tmp_path):
    _parquet(tmp_path / "a.parquet", ["a", "b", "a"])
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(
        "smollm2-135m-instruct", str(tmp_path / "out"),
        input={"path": str(tmp_path / "a.parquet"), "id_column": "id", "limit": None}, output={"carry": []}))
    p = cli("validate", cfg, "--no-estimate", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip() == ("error: input.id_column 'id': duplicate values: 'a' (rows a.parquet#0, a.parquet#2); "
                                "every row needs a unique id")
    assert not (tmp_path / "out").exists()


def test_jsonl_planning_stops_at_the_limit(tmp_path):
    path = tmp_path / "big.jsonl"
    _jsonl(path, [{"id": i, "t": "x" * (i % 7)} for i in range(1000)])
    with open(path, "ab") as f:
        f.write(b"{not json, never read: past the limit}\n")
    inp = _input(format="jsonl", path=str(path), id_column="id", limit=25)
    plan = plan_input(inp, 10)
    assert plan.total_rows == 25 and plan.files["big.jsonl"]["rows"] == 25
    assert [r["__id"] for u in plan.units for r in read_unit(inp, u)] == [str(i) for i in range(25)]
    assert plan.units[-1].byte_end == len("".join(json.dumps({"id": i, "t": "x" * (i % 7)}) + "\n"
                                                   for i in range(25)))


def test_planning_many_local_files_opens_each_once(tmp_path, monkeypatch):
    for i in range(1000):
        _parquet(tmp_path / f"part{i:04d}.parquet", [f"{i}-{j}" for j in range(3)])
    opened: list[str] = []
    make_fs = sources.make_fs

    def counting_make_fs(path, opts):
        fs, root = make_fs(path, opts)
        real_open = fs.open
        monkeypatch.setattr(fs, "open", lambda p, *a, **kw: opened.append(p) or real_open(p, *a, **kw))
        return fs, root

    monkeypatch.setattr(sources, "make_fs", counting_make_fs)
    plan = plan_input(_input(path=str(tmp_path), id_column="id"), 100)
    assert plan.total_rows == 3000 and len(plan.files) == 1000
    assert len(opened) == 1000 and len(set(opened)) == 1000  # footer and id column in one open per file
