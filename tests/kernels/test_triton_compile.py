"""Every Triton kernel variant the launch code can choose, compiled ahead of
time for sm_80 and sm_90 without a GPU (triton.compile with a GPUTarget).

The interpreter tests (tests/kernels/interpreter/) accept code that no GPU
compiles, e.g. `tl.dot` on bf16 tiles below 16: this is the check that
catches it, and test_compile_check_can_fail shows that it does. Compiles run
in a fresh process (tests/kernels/triton_aot.py): code generation fails in a
process that imported triton under its interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = Path(__file__).with_name("triton_aot.py")
KERNELS = {"_write_kv_kernel", "_decode_split_kernel", "_decode_reduce_kernel", "_prefill_kernel",
           "_add_rms_norm_kernel", "_rotary_kernel", "_silu_and_mul_kernel"}


def aot(*args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_every_launch_config_compiles_for_sm80_and_sm90(dtype):
    rows = aot(dtype, "80", "90")
    assert {r["kernel"] for r in rows} == KERNELS
    assert {r["sm"] for r in rows} == {80, 90}
    for r in rows:
        assert "error" not in r, r
        assert r["cubin_bytes"] > 1000, r
        assert r["ptx_target"].startswith(f".target sm_{r['sm']}"), r


def test_compile_check_can_fail():
    # A bf16 8x8 dot runs in the interpreter, but no GPU compiles it; 16x16 compiles.
    ok, bad = aot("small_dot", "80", "16", "8")
    assert "error" not in ok and ok["cubin_bytes"] > 0, ok
    assert bad.get("error", "").startswith("CompilationError"), bad
