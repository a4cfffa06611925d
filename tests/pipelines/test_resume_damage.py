"""Resume after damage, end to end through run_job with the real engine: a
finished output whose shard was truncated and whose manifest was deleted is
finished again by the same command, every id exactly once, the damaged shard
kept under _damaged/."""
from __future__ import annotations

import io

import pytest

from batchlm.pipelines.config import parse_config
from batchlm.pipelines.runner import run_job

from .helpers import input_ids, read_output, tiny_job

pytestmark = pytest.mark.ray_cluster


def test_truncated_shard_and_deleted_manifest_are_redone_once(tmp_path, tiny_model, local_ray):
    out = tmp_path / "out"
    cfg = parse_config(tiny_job(tiny_model, str(out)))
    first = run_job(cfg, stream=io.StringIO())
    assert first.complete and first.rows == 40
    part = out / "part-000001.parquet"
    kept = part.read_bytes()
    part.write_bytes(kept[: len(kept) // 3])
    (out / "_manifest.json").unlink()
    log = io.StringIO()
    again = run_job(cfg, stream=log)
    text = log.getvalue()
    assert again.complete and again.generated_rows == 10, text
    assert "no _manifest.json; rebuilding it from 4 shard(s)' own records" in text
    assert "part-000001.parquet is damaged" in text and "unit 1 will be generated again" in text
    ids = read_output(str(out))["id"].to_pylist()
    assert len(ids) == 40 and sorted(ids) == sorted(input_ids(40))
    damaged = list((out / "_damaged").iterdir())
    assert len(damaged) == 1 and damaged[0].read_bytes() == kept[: len(kept) // 3]
    assert (out / "_SUCCESS").exists()
