"""Inputs other than Parquet, and bad rows: a Hugging Face dataset saved with
save_to_disk; JSON Lines with a null, an int where text is expected, a
template error, a too-long prompt and a broken line (each written with its
error, the rest completing); `on_error: fail` naming the row. JSON Lines
line endings: one rule for planning and reading (a bare \\r inside a line,
\\r\\n endings, Unicode line separators inside strings), old-Mac files refused
by name, and a file changed after planning is a ConfigError, not a crash."""
from __future__ import annotations

import io
import json

import pytest

from batchlm.pipelines.config import parse_config
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.runner import run_job
from batchlm.pipelines.sources import plan_input, read_unit

from .helpers import cli, read_output, tiny_job, write_yaml

pytestmark = pytest.mark.ray_cluster


def test_huggingface_save_to_disk_input(tmp_path, tiny_model, local_ray):
    import datasets

    texts = [f"passage number {i} about the python data model" for i in range(30)]
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"doc": [f"d{i}" for i in range(30)], "body": texts}),
        "test": datasets.Dataset.from_dict({"doc": ["t0"], "body": ["x"]}),
    })
    dd.save_to_disk(str(tmp_path / "hf"))
    out = tmp_path / "out"
    cfg = parse_config(tiny_job(tiny_model, str(out), input={
        "format": "huggingface", "path": str(tmp_path / "hf"), "split": "train", "id_column": "doc", "limit": None},
        task={"prompt": "Summarize: {{ body }}"}, output={"carry": ["body"], "rows_per_shard": 7}))
    result = run_job(cfg, stream=io.StringIO())
    assert result.complete and result.rows == 30 and result.errors == 0
    table = read_output(str(out))
    assert sorted(table["doc"].to_pylist()) == sorted(f"d{i}" for i in range(30))
    assert table.column_names[:2] == ["doc", "body"]


def _bad_jsonl(path) -> list[str]:
    lines = [json.dumps({"id": f"ok{i}", "text": f"a short passage {i}"}) for i in range(6)]
    lines += [
        json.dumps({"id": "null-text", "text": None}),
        json.dumps({"id": "int-text", "text": 12345}),
        json.dumps({"id": "template-error", "text": "fine", "boom": True}),
        json.dumps({"id": "too-long", "text": "many words " * 400}),
        "{this is not json",
        '{"id": "cr-inside",\r "text": "a bare carriage return between keys"}\r',  # ends \r\n
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return lines


PROMPT = "Summarize: {{ text }}{% if boom is defined and boom %}{{ 1 // 0 }}{% endif %}"


def test_malformed_rows_are_recorded_and_the_rest_complete(tmp_path, tiny_model, local_ray):
    _bad_jsonl(tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    cfg = parse_config(tiny_job(tiny_model, str(out), input={"format": "jsonl", "path": str(tmp_path / "rows.jsonl"),
                                                             "id_column": "id", "limit": None},
                                task={"prompt": PROMPT}, output={"carry": ["text"], "rows_per_shard": 4}))
    log = io.StringIO()
    result = run_job(cfg, stream=log)
    assert result.complete and result.rows == 12 and result.errors == 5
    rows = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    assert len(rows) == 12
    assert all(rows[k]["error"] is None and rows[k]["finish_reason"] in ("length", "stop")
               for k in [f"ok{i}" for i in range(6)] + ["cr-inside"])
    assert "null" in rows["null-text"]["error"] and "text" in rows["null-text"]["error"]
    assert "int" in rows["int-text"]["error"] and "where text is expected" in rows["int-text"]["error"]
    assert rows["int-text"]["text"] == "12345"  # untyped input: carried as text
    assert "ZeroDivisionError" in rows["template-error"]["error"]
    assert "max_model_len" in rows["too-long"]["error"]
    broken = [r for k, r in rows.items() if k.startswith("rows.jsonl#")]
    assert len(broken) == 1 and "invalid JSON" in broken[0]["error"]
    assert all(r["finish_reason"] == "error" for r in rows.values() if r["error"])
    assert "errors          5" in log.getvalue()

    # truncate instead: the long row now completes from its last tokens
    out2 = tmp_path / "out2"
    cfg2 = parse_config(tiny_job(tiny_model, str(out2), input={"format": "jsonl", "path": str(tmp_path / "rows.jsonl"),
                                                               "id_column": "id", "limit": None},
                                 task={"prompt": PROMPT, "on_long_prompt": "truncate"}, output={"carry": []}))
    run_job(cfg2, stream=io.StringIO())
    long_row = [r for r in read_output(str(out2)).to_pylist() if r["id"] == "too-long"][0]
    assert long_row["error"] is None and long_row["num_input_tokens"] <= 256 - 8


def test_on_error_fail_stops_and_names_the_row(tmp_path, tiny_model):
    _bad_jsonl(tmp_path / "rows.jsonl")
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(
        tiny_model, str(tmp_path / "out"), input={"format": "jsonl", "path": str(tmp_path / "rows.jsonl"),
                                                  "id_column": "id", "limit": None},
        task={"prompt": PROMPT}, output={"on_error": "fail", "rows_per_shard": 100, "carry": []}))
    p = cli("run", cfg)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert "row 'null-text' failed" in p.stderr or "row 'int-text' failed" in p.stderr, p.stderr[-2000:]


def _jsonl_input(path, **kw):
    return parse_config({"input": {"format": "jsonl", "path": str(path), **kw}, "task": {"prompt": "x"},
                         "output": {"path": "o"}}).input


def test_jsonl_planning_and_reading_split_lines_alike(tmp_path):
    texts = [f"passage {i}" for i in range(9)]
    texts[4] = "unicode separators stay inside: \u2028 \u2029 \x85 \x1c end"
    lines = [json.dumps({"id": f"r{i}", "text": t}, ensure_ascii=False).encode() for i, t in enumerate(texts)]
    lines[1] = b'{"id": "r1",\r "text": "passage 1"}'  # a bare \r: JSON whitespace, not a line break
    lines[2] = b'{"id": "r2",\r\r\t"text":\r"passage 2"}\r'  # several, and a \r\n ending
    lines[6] += b"\r"  # \r\n ending
    data = b"\n".join(lines[:5]) + b"\n\r\n  \n" + b"\n".join(lines[5:])  # blank lines, no final \n
    (tmp_path / "rows.jsonl").write_bytes(data)
    inp = _jsonl_input(tmp_path / "rows.jsonl", id_column="id")
    for per_unit in (1, 2, 4, 9):
        plan = plan_input(inp, per_unit)
        rows = [r for u in plan.units for r in read_unit(inp, u)]
        assert plan.total_rows == 9 and [r["__id"] for r in rows] == [f"r{i}" for i in range(9)]
        assert [r["text"] for r in rows] == texts and not any("__error" in r for r in rows)


def test_jsonl_with_old_mac_line_endings_is_refused_by_name(tmp_path):
    records = [json.dumps({"id": i, "text": f"t{i}"}).encode() for i in range(3)]
    (tmp_path / "mac.jsonl").write_bytes(b"\r".join(records) + b"\r")
    with pytest.raises(ConfigError) as e:
        plan_input(_jsonl_input(tmp_path / "mac.jsonl"), 10)
    assert str(e.value) == ("input mac.jsonl: row 0 holds several records separated by a bare \\r (old Mac "
                            "line endings); JSON Lines ends each line with \\n: convert the file (tr '\\r' '\\n')")
    (tmp_path / "mac.jsonl").write_bytes(records[0] + b"\r")  # one record ending in \r alone is one row
    inp = _jsonl_input(tmp_path / "mac.jsonl")
    assert [r["text"] for u in plan_input(inp, 10).units for r in read_unit(inp, u)] == ["t0"]


def test_jsonl_changed_after_planning_is_a_config_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(6)))
    inp = _jsonl_input(path)
    units = plan_input(inp, 3).units
    path.write_text("".join(json.dumps({"text": f"t{i} is longer now"}) + "\n" for i in range(6)))
    with pytest.raises(ConfigError, match=r"^input rows.jsonl: bytes 0-45 now hold 2 rows, the plan has 3: "
                                          r"the file changed after the run was planned$"):
        read_unit(inp, units[0])
