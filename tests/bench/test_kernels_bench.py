"""`python -m batchlm bench kernels` on the CPU with tiny sizes: the references
run, the report has every kernel with positive times and rates against the
ceilings measured in the same run, and it says that Triton needs CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from batchlm.bench import cli

KERNELS = {"decode attention", "prefill attention", "kv cache write", "residual add + rmsnorm", "rotary",
           "silu and mul"}
TINY = ["--decode-seqs", "3", "--decode-context", "40", "--prefill-seqs", "2", "--prefill-len", "17",
        "--tokens", "5", "--copy-mib", "2", "--matmul-n", "64", "--warmup", "1", "--repeats", "3"]


def test_bench_kernels_cpu_report(tmp_path):
    out = tmp_path / "kernels.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "batchlm", "bench", "kernels", "--device", "cpu",
                           "--dtype", "float32", *TINY, "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Triton needs CUDA" in proc.stdout
    rep = json.loads(out.read_text())
    assert rep["device_type"] == "cpu" and rep["dtype"] == "float32" and rep["triton"] is False
    c = rep["ceilings"]
    assert c["copy_gb_s"] > 0 and c["matmul_bf16_tflop_s"] > 0 and c["copy_mib"] == 2 and c["matmul_n"] == 64
    assert {r["kernel"] for r in rep["rows"]} == KERNELS
    assert {r["impl"] for r in rep["rows"]} == {"torch"}
    for r in rep["rows"]:
        assert r["median_us"] > 0 and r["bytes"] > 0 and r["gb_s"] > 0, r
        assert r["pct_copy_bw"] == pytest.approx(100 * r["gb_s"] / c["copy_gb_s"])
        assert r["pct_matmul"] == pytest.approx(100 * r["tflop_s"] / c["matmul_bf16_tflop_s"])
        assert r["kernel"] in proc.stdout
    decode = next(r for r in rep["rows"] if r["kernel"] == "decode attention")
    assert decode["shape"].startswith("3 seqs x 40 ctx")
    assert decode["flops"] == 4 * 3 * 9 * 40 * 64  # 4 x seqs x heads x context x head dim


def test_bench_kernels_arguments():
    args = cli.build_parser().parse_args(["bench", "kernels"])
    assert args.func is cli._run_kernels and args.decode_seqs is None and args.heads == 9
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "kernels", "--decode-seqs", "0"])
    proc = subprocess.run([sys.executable, "-m", "batchlm", "bench", "kernels", "--heads", "4", "--kv-heads", "3",
                           *TINY], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "heads (4) must be a multiple of kv_heads (3)" in proc.stderr
    # the decode sweep times Triton kernels: refused on the CPU, before any measuring
    proc = subprocess.run([sys.executable, "-m", "batchlm", "bench", "kernels", "--device", "cpu", "--decode-sweep",
                           *TINY], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--decode-sweep times the Triton decode kernel: it needs CUDA" in proc.stderr
    assert "ceilings" not in proc.stdout
