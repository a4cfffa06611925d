"""S3 in and out over HTTP against moto's ThreadedMotoServer on 127.0.0.1 (the
way s3fs tests itself): a run killed with -9 after its first shard, then
resumed; every id once; only shards, the manifest and _SUCCESS in the bucket
(no temporary objects); `status` reads the S3 output."""
from __future__ import annotations

import os
import time

import pytest

from .helpers import CLI, DOCS, cli, free_port, input_ids, read_output, tiny_job, write_yaml
from .procs import kill_driver, start_driver

pytestmark = pytest.mark.ray_cluster
ROWS, PER_UNIT = 64, 8


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    # NOTE: moto keeps its buckets in process-wide state, so a server started by an earlier test in
    # this process (test_openai_batch uses this fixture too) would leave its buckets here: start empty.
    import urllib.request

    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "${AWS_ACCESS_KEY_ID}",
            "secret": "${AWS_SECRET_ACCESS_KEY}"}
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=opts["endpoint_url"], key="testing", secret="testing")
    fs.mkdir("batchlm-in")
    fs.mkdir("batchlm-out")
    fs.put(str(DOCS), "batchlm-in/docs/python_docs.parquet")
    yield fs, opts
    server.stop()


def test_s3_in_and_out_with_resume_after_kill(tmp_path, tiny_model, s3):
    fs, opts = s3
    cfg = write_yaml(tmp_path / "job.yaml", tiny_job(
        tiny_model, "s3://batchlm-out/run1", input={"path": "s3://batchlm-in/docs/", "limit": ROWS, "storage_options": opts},
        output={"rows_per_shard": PER_UNIT, "storage_options": opts}, resources={"batch_size": PER_UNIT},
        sampling={"max_tokens": 16}))
    log = tmp_path / "driver.log"
    proc = start_driver([*CLI, "run", cfg], dict(os.environ), log)
    t0 = time.monotonic()
    def shards():
        try:
            return {p for p in fs.ls("batchlm-out/run1", refresh=True) if "/part-" in p}
        except FileNotFoundError:
            return set()

    while not shards():
        assert time.monotonic() - t0 < 300 and proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)
    kill_driver(proc)
    done_before = shards()
    assert 0 < len(done_before) < ROWS // PER_UNIT
    etags = {p: fs.info(p)["ETag"] for p in done_before}

    p = cli("run", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"{len(done_before)} units already committed" in p.stderr
    assert "testing" not in p.stderr + p.stdout  # the secret is never printed
    names = sorted(x.rsplit("/", 1)[-1] for x in fs.ls("batchlm-out/run1", refresh=True))
    assert names == sorted(["_SUCCESS", "_manifest.json", *[f"part-{u:06d}.parquet" for u in range(ROWS // PER_UNIT)]])
    assert {q: fs.info(q)["ETag"] for q in done_before} == etags  # committed shards untouched
    uploads = fs.call_s3("list_multipart_uploads", Bucket="batchlm-out").get("Uploads", [])
    assert uploads == []  # no hidden temporary parts either
    table = read_output("s3://batchlm-out/run1", {"endpoint_url": opts["endpoint_url"], "key": "testing", "secret": "testing"})
    assert sorted(table["id"].to_pylist()) == sorted(input_ids(ROWS))

    st = cli("status", "s3://batchlm-out/run1", "--storage-option", f"endpoint_url={opts['endpoint_url']}")
    assert st.returncode == 0 and "complete" in st.stdout and f"{ROWS}/{ROWS}" in st.stdout, st.stderr
