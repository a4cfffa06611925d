"""`validate` on a good config (counts, token statistics, too-long rows, an
estimate) and a job asking for GPUs the cluster lacks (refused at once)."""
from __future__ import annotations

import io

import pytest

from batchlm.pipelines.config import parse_config
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.runner import run_job

from .helpers import cli, tiny_job, write_yaml


def test_validate_reports_rows_tokens_and_estimate(tmp_path, tiny_model):
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(tiny_model, str(tmp_path / "out"), input={"limit": 30},
                                                     model={"max_model_len": 40}))
    p = cli("validate", cfg, "--sample", "20")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "30 rows in 3 work units" in p.stdout
    assert "prompt tokens mean" in p.stdout
    assert "20 of 20 sampled rows exceed max_model_len 40 (recorded as errors)" in p.stdout
    assert "estimate" in p.stdout
    assert not (tmp_path / "out").exists()  # validate writes nothing


@pytest.mark.ray_cluster
def test_missing_gpus_fail_at_once(tmp_path, tiny_model, local_ray):
    cfg = parse_config(tiny_job(tiny_model, str(tmp_path / "out"), resources={"gpus_per_replica": 1, "replicas": 2}))
    with pytest.raises(ConfigError, match=r"2 replica\(s\) need 2 GPUs but the cluster has 0"):
        run_job(cfg, stream=io.StringIO())
