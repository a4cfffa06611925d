"""`ray job submit --working-dir . -- python -m batchlm run job.yaml`
against a local Ray head on 127.0.0.1 (dashboard on, as a cluster has it):
the job runs on the cluster, not in an embedded Ray, and writes its output.
The head is started with --block in its own session and stopped by killing
that session (never `ray stop`, which would stop every Ray on the machine)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from .helpers import REPO, free_port, input_ids, read_output, tiny_job, write_yaml
from .procs import kill_driver, start_driver

pytestmark = pytest.mark.ray_cluster
ROWS = 16


def test_ray_job_submit_to_local_head(tmp_path, tiny_model):
    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    # NOTE: the agent's HTTP port too: its default (52365) is taken whenever another Ray runs on this
    # machine (an embedded Ray of another test or job), and then no job can be submitted.
    port, dash, agent = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = start_driver([ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                         f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", "--disable-usage-stats"],
                        env, tmp_path / "head.log")
    try:
        work = tmp_path / "work"
        work.mkdir()
        out = tmp_path / "out"
        write_yaml(work / "job.yaml", tiny_job(tiny_model, str(out), input={"limit": ROWS},
                                               output={"rows_per_shard": 8}))
        submit = [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(work),
                  "--", sys.executable, "-m", "batchlm", "run", "job.yaml"]
        t0 = time.monotonic()
        not_ready = ("Connection", "No available agent")  # the dashboard, then its agent, take a while to start
        while True:
            p = subprocess.run(submit, capture_output=True, text=True, timeout=600, cwd=REPO,
                               env={**env, "RAY_AUTH_MODE": "token"})  # send the head's token (~/.ray)
            said = p.stderr + p.stdout
            if p.returncode == 0 or time.monotonic() - t0 > 180 or not any(s in said for s in not_ready):
                break
            time.sleep(2)
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:], (tmp_path / "head.log").read_text()[-2000:])
        assert "batchlm run: complete" in p.stdout + p.stderr
        assert "succeeded" in p.stdout + p.stderr
        table = read_output(str(out))
        assert sorted(table["id"].to_pylist()) == sorted(input_ids(ROWS))
    finally:
        kill_driver(head, grace=0.2)
