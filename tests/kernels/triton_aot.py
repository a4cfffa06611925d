"""Ahead-of-time compile of the Triton kernels for a GPU target, without a
GPU: run by tests/kernels/test_triton_compile.py in a fresh process, since
triton must be imported without its interpreter for code generation.

`python tests/kernels/triton_aot.py DTYPE SM [SM ...]` compiles every launch
configuration of the shapes below; `... small_dot SM B [B ...]` compiles a
bf16 BxB tl.dot for each B. Prints one JSON object per compile: kernel, constexprs, target,
cubin bytes, ptx target line (or the error).
"""
from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from batchlm.kernels import triton_attention as ta  # noqa: E402
from batchlm.kernels import triton_layers as tk  # noqa: E402

# (num_heads, num_kv_heads, head_dim, hidden, intermediate): the default
# model (SmolLM2-135M, GQA 3, head dim 64) and a Llama-3-8B-like one (GQA 4,
# head dim 128).
MODEL_SHAPES = [(9, 3, 64, 576, 1536), (32, 8, 128, 4096, 14336)]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@triton.jit
def small_dot_kernel(x_ptr, y_ptr, B: tl.constexpr):
    o = tl.arange(0, B)
    a = tl.load(x_ptr + o[:, None] * B + o[None, :])
    tl.store(y_ptr + o[:, None] * B + o[None, :], tl.dot(a, a))


def configs(dtype):
    seen, out = set(), []
    for H, KVH, D, hidden, inter in MODEL_SHAPES:
        per_shape = tk.launch_configs(hidden, D, D, inter, dtype)
        for bs in ta.SUPPORTED_BLOCK_SIZES:
            per_shape += ta.launch_configs(H, KVH, D, bs, dtype)
        for cfg in per_shape:
            key = (cfg.kernel.__name__, repr(sorted(cfg.signature.items())), repr(sorted(cfg.constexprs.items())))
            if key not in seen:
                seen.add(key)
                out.append(cfg)
    return out


def compile_one(cfg, sm):
    row = {"kernel": cfg.kernel.__name__, "constexprs": cfg.constexprs, "sm": sm}
    try:
        src = ASTSource(fn=cfg.kernel, signature=cfg.signature, constexprs=cfg.constexprs)
        out = triton.compile(src, target=GPUTarget("cuda", sm, 32),
                             options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as e:  # reported to the test, which decides
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    row["cubin_bytes"] = len(out.asm["cubin"])
    row["ptx_target"] = next(line for line in out.asm["ptx"].splitlines() if line.startswith(".target"))
    return row


def main(argv):
    if argv[0] == "small_dot":
        sig = {"x_ptr": "*bf16", "y_ptr": "*fp32", "B": "constexpr"}
        cfgs = [ta.LaunchConfig(small_dot_kernel, sig, {"B": int(b)}, 4) for b in argv[2:]]
        sms = argv[1:2]
    else:
        cfgs, sms = configs(DTYPES[argv[0]]), argv[1:]
    for sm in sms:
        for cfg in cfgs:
            print(json.dumps(compile_one(cfg, int(sm))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
