"""Inputs other than Parquet, and bad rows: a Hugging Face dataset saved with
save_to_disk; JSON Lines with a null, an int where text is expected, a
template error, a too-long prompt and a broken line (each written with its
error, the rest completing); `on_error: fail` naming the row."""
from __future__ import annotations

import io
import json

import pytest

from batchlm.pipelines.config import parse_config
from batchlm.pipelines.runner import run_job

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
    ]
    path.write_text("\n".join(lines) + "\n")
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
    assert result.complete and result.rows == 11 and result.errors == 5
    rows = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    assert len(rows) == 11
    assert all(rows[f"ok{i}"]["error"] is None and rows[f"ok{i}"]["finish_reason"] in ("length", "stop")
               for i in range(6))
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
