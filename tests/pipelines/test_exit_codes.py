"""Exit codes and one-line errors of `batchlm run`, caused for real: problems
found before Ray starts (exit 2, nothing written), a run whose every row
failed (exit 1, no _SUCCESS), SIGTERM (exit 143 like Ctrl-C, a resume hint,
no stack dumps), and a second run on an output that is being written
(refused by the lease while the first is alive)."""
from __future__ import annotations

import io
import os
import signal
import time

import pytest

from batchlm.pipelines.config import parse_config
from batchlm.pipelines.runner import run_job

from .helpers import CLI, cli, input_ids, read_output, tiny_job, write_yaml
from .procs import kill_driver, start_driver


def _one_line_exit_2(p, expect: str) -> None:
    assert p.returncode == 2, p.stderr[-2000:]
    assert expect in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len([ln for ln in p.stderr.splitlines() if ln.startswith("error:")]) == 1, p.stderr


@pytest.mark.parametrize("case,expect", [
    ("model_typo", "model.name: model 'smollm2-135m-instruc': no such file"),
    ("draft_typo", "model.speculative_config.model: model 'no-such-draft': no such file"),
    ("no_id_column", "input.id_column: no column(s) 'ID'"),
    ("jsonl_as_parquet", "cannot be read: Parquet magic bytes not found"),
    ("bad_storage_option", "a storage option is not one the filesystem accepts"),
])
def test_problems_found_before_ray_starts(tmp_path, tiny_model, case, expect):
    out = tmp_path / "out"
    job = tiny_job(tiny_model, str(out))
    if case == "model_typo":
        job["model"]["name"] = "smollm2-135m-instruc"
    elif case == "draft_typo":
        job["model"]["speculative_config"] = {"method": "draft", "model": "no-such-draft",
                                              "num_speculative_tokens": 3}
    elif case == "no_id_column":
        job["input"]["id_column"] = "ID"
    elif case == "jsonl_as_parquet":
        (tmp_path / "rows.parquet").write_text('{"id": "a", "text": "x"}\n')
        job["input"]["path"] = str(tmp_path / "rows.parquet")
    else:
        job["input"] = {"format": "parquet", "path": "s3://bucket/data.parquet",
                        "storage_options": {"endpointurl": "http://127.0.0.1:9"}}
    t0 = time.monotonic()
    p = cli("run", write_yaml(tmp_path / "c.yaml", job), timeout=120)
    _one_line_exit_2(p, expect)
    assert not out.exists(), "nothing may be written before the config and input are known good"
    assert time.monotonic() - t0 < 60, "found before Ray and the engine start"


@pytest.mark.ray_cluster
def test_every_row_failing_is_incomplete_without_success(tmp_path, tiny_model, local_ray):
    out = tmp_path / "out"
    cfg = parse_config(tiny_job(tiny_model, str(out), task={"prompt": "{{ text | length }}"}))
    result = run_job(cfg, stream=io.StringIO())
    assert not result.complete and result.errors == result.rows == 40
    assert not (out / "_SUCCESS").exists()
    assert read_output(str(out))["error"].null_count == 0


@pytest.mark.ray_cluster
def test_second_writer_refused_and_sigterm_stops_like_ctrl_c(tmp_path, tiny_model):
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tiny_model, str(out)))
    log = tmp_path / "first.log"
    # the first run pauses inside its first shard write, holding the lease
    first = start_driver([*CLI, "run", cfg], {**os.environ, "BATCHLM_FAILPOINTS": "shard_write=120"}, log)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(".batchlm-tmp-part-*")):
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        second = cli("run", cfg, timeout=120)
        _one_line_exit_2(second, f"is being written by another run (host {os.uname().nodename}, pid {first.pid}")
        os.kill(first.pid, signal.SIGTERM)
        assert first.wait(timeout=60) == 143, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            kill_driver(first)
    text = log.read_text()
    assert "terminated (SIGTERM); run the same command again to resume" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert not (out / "_lease.json").exists(), "a stopped run releases its lease"
    done = cli("run", cfg, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed 1 temporary file(s)" in done.stderr
    ids = read_output(str(out))["id"].to_pylist()
    assert sorted(ids) == sorted(input_ids(40))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("part-")) == ["_SUCCESS", "_manifest.json"]
