"""The one place that picks a kernel implementation for a device.

CUDA tensors go to the Triton kernels (when triton is installed), CPU
tensors to the PyTorch references. `name="triton"` forces Triton; on the CPU
that runs Triton's interpreter, which needs TRITON_INTERPRET=1 in the
environment before the kernels are imported.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from batchlm.kernels.attention import TorchPagedAttention

ATTENTION_BACKENDS = ("auto", "torch", "triton")


# KV-cache dtypes the Triton attention reads (an fp8 cache stays on the reference).
TRITON_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def get_attention_backend(device: torch.device | str, name: str | None = None,
                          kv_cache_dtype: torch.dtype | None = None):
    """Return the paged-attention backend for `device`.

    name: None/"auto" picks Triton on CUDA when triton is installed and the
    cache dtype is one it reads, else the PyTorch reference; "torch" or
    "triton" forces one.
    """
    name = name or "auto"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    device = torch.device(device)
    triton_cache = kv_cache_dtype is None or kv_cache_dtype in TRITON_CACHE_DTYPES
    if name == "torch" or (name == "auto" and (device.type != "cuda" or not triton_cache
                                               or not _triton_installed())):
        return TorchPagedAttention()
    if not triton_cache:
        raise ValueError(f"attention_backend='triton' reads KV caches in float32, bfloat16 or float16, "
                         f"not {kv_cache_dtype} (kv_cache_dtype); use attention_backend='auto' or 'torch'")
    if not _triton_installed():
        raise ValueError("attention_backend='triton' needs the triton package: pip install 'batchlm[triton]'")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend='triton' on the CPU runs Triton's interpreter: set "
                         "TRITON_INTERPRET=1 in the environment before starting (or use "
                         "attention_backend='torch')")
    from batchlm.kernels.triton_attention import TritonPagedAttention

    return TritonPagedAttention(device)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
