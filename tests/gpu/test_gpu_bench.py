"""`bench kernels` on a CUDA device: the Triton kernels and the PyTorch
references both run, on small sizes, and every row has positive rates.
Skipped without CUDA. Passed on an H100, 2026-11-26."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bench_kernels_on_cuda_runs_triton_and_references(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "batchlm", "bench", "kernels", "--device", "cuda",
                           "--decode-seqs", "32", "--decode-context", "512", "--prefill-seqs", "2",
                           "--prefill-len", "256", "--tokens", "256", "--copy-mib", "256", "--matmul-n", "2048",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["triton"] is True and rep["note"] is None and rep["dtype"] in ("bfloat16", "float16")
    kernels = {r["kernel"] for r in rep["rows"]}
    assert len(kernels) == 6
    for k in kernels:
        assert {r["impl"] for r in rep["rows"] if r["kernel"] == k} == {"torch", "triton"}, k
    assert all(r["median_us"] > 0 and r["gb_s"] > 0 for r in rep["rows"])
