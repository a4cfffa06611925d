"""Extraction jobs end to end on a tiny random model (garbage unless constrained): the engine stage
in process, and `python -m batchlm run` killed with SIGKILL and resumed. Every row is written once;
the typed columns have the schema's Arrow types; every good row validates against the schema; rows
cut by max_tokens are error rows with their text kept."""
from __future__ import annotations

import json
import os
import time

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchlm.pipelines.config import parse_config
from batchlm.pipelines.extract import arrow_schema
from batchlm.pipelines.runner import engine_stage_kwargs
from batchlm.pipelines.stages import EngineStage, output_schema

from .helpers import CLI, cli, input_ids, read_output, rendered_rows, run_engine_stage, tiny_job, write_yaml
from .procs import kill_driver, start_driver

# Short values (the tiny model's byte tokenizer spends one token per character): nested object, enum,
# array, numbers, required and optional properties. `note`'s length varies most from row to row.
SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "x": {"type": "number", "minimum": 0, "maximum": 9},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
        "pos": {"type": "object", "properties": {"row": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["row"], "additionalProperties": False},
        "note": {"type": "string", "maxLength": 30},
    },
    "required": ["kind", "ok", "n", "pos"],
    "additionalProperties": False,
}
TYPES = {"kind": pa.string(), "ok": pa.bool_(), "n": pa.int64(), "x": pa.float64(),
         "tags": pa.list_(pa.field("item", pa.string(), nullable=False)),
         "pos": pa.struct([pa.field("row", pa.int64(), nullable=False)]), "note": pa.string()}
CUT = "output cut by max_tokens"


def _job(tiny_model: str, out: str, rows: int, max_tokens: int, **over) -> dict:
    return tiny_job(tiny_model, out, input={"limit": rows},
                    task={"type": "extract", "schema": SCHEMA, "prompt": "Extract: {{ text[:60] }}"},
                    sampling={"max_tokens": max_tokens}, **over)


def _check_rows(table, max_tokens: int) -> tuple[int, int]:
    """Each row: valid and typed, or an error; (good rows, rows cut by max_tokens)."""
    good = cut = 0
    for row in table.to_pylist():
        if row["error"] is None:
            obj = json.loads(row["generated_text"])
            jsonschema.validate(obj, SCHEMA)
            assert row["finish_reason"] == "stop"
            for name in SCHEMA["properties"]:
                want = obj.get(name)
                assert row[name] == (float(want) if name == "x" and want is not None else want), (name, row)
            good += 1
        else:
            assert row["error"].startswith(CUT) and row["finish_reason"] == "length", row
            assert row["num_output_tokens"] == max_tokens and row["generated_text"]
            assert all(row[name] is None for name in SCHEMA["properties"])
            cut += 1
    return good, cut


def test_engine_stage_writes_typed_columns_and_cut_rows_as_errors(tiny_model):
    cfg = parse_config(_job(tiny_model, "unused", 24, 52, model={"dtype": "float32"}))
    stage = EngineStage(**engine_stage_kwargs(cfg))
    out = run_engine_stage(stage, rendered_rows(cfg)).drop_columns(["__unit", "__row"])
    assert out.schema.equals(pa.schema([out.schema.field("id"), *output_schema("extract", None, SCHEMA)]))
    for name, t in TYPES.items():
        assert out.schema.field(name).type == t, name
    good, cut = _check_rows(out, 52)
    assert good + cut == 24 and good > 0 and cut > 0, (good, cut)  # both kinds at this max_tokens

    tight = parse_config(_job(tiny_model, "unused", 6, 3, model={"dtype": "float32"}))
    out = run_engine_stage(EngineStage(**engine_stage_kwargs(tight)), rendered_rows(tight))
    assert _check_rows(out, 3) == (0, 6)  # no object of this schema fits in 3 tokens


@pytest.mark.ray_cluster
def test_extract_job_killed_and_resumed(tmp_path, tiny_model):
    rows, per_unit, max_tokens = 30, 5, 52
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", _job(
        tiny_model, str(out), rows, max_tokens, model={"dtype": "float32"},
        output={"rows_per_shard": per_unit}, resources={"batch_size": per_unit}))
    log = tmp_path / "driver.log"
    proc = start_driver([*CLI, "run", cfg], dict(os.environ), log)
    t0 = time.monotonic()
    while not list(out.glob("part-*.parquet")):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 300, log.read_text()[-3000:]
        time.sleep(0.05)
    kill_driver(proc)
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 0 < len(committed) < rows // per_unit, "the kill should land mid-run"

    proc = start_driver([*CLI, "run", cfg], dict(os.environ), log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert {n: (out / n).stat().st_mtime_ns for n in committed} == committed  # committed shards kept
    table = read_output(str(out))
    assert sorted(table["id"].to_pylist()) == sorted(input_ids(rows))  # every row exactly once
    for shard in out.glob("part-*.parquet"):  # the Parquet files' own schema
        schema = pq.read_schema(shard)
        assert {n: schema.field(n).type for n in TYPES} == TYPES
    assert arrow_schema(SCHEMA).names == [n for n in table.column_names if n in TYPES]
    good, cut = _check_rows(table, max_tokens)
    assert good > 0 and cut > 0
    summary = log.read_text().rsplit("batchlm run: complete", 1)[-1]
    assert f"  errors          {cut}\n" in summary and CUT in summary, summary
    assert (out / "_SUCCESS").exists()


def test_generate_task_passes_structured_outputs_to_the_engine(tiny_model):
    cfg = parse_config(tiny_job(tiny_model, "unused", input={"limit": 8}, model={"dtype": "float32"},
                                sampling={"max_tokens": 16, "temperature": 1.0, "seed": 3,
                                          "structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}))
    out = run_engine_stage(EngineStage(**engine_stage_kwargs(cfg)), rendered_rows(cfg))
    assert out["error"].null_count == 8
    assert set(out["generated_text"].to_pylist()) <= {"alpha", "beta", "gamma"}


@pytest.mark.ray_cluster
def test_on_error_fail_stops_at_a_row_that_does_not_parse(tmp_path, tiny_model):
    cfg = write_yaml(tmp_path / "job.yaml", _job(tiny_model, str(tmp_path / "out"), 10, 3,
                                                 model={"dtype": "float32"}, output={"on_error": "fail"}))
    r = cli("run", cfg, timeout=300)
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"failed: {CUT}" in r.stderr and "(output.on_error: fail)" in r.stderr
