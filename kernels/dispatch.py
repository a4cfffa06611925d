"""The one place that picks a kernel implementation for a device.

One switch, `attention_backend` (engine option and YAML), picks the
implementation of every kernel: the paged attention
(`get_attention_backend`) and the fused layer kernels (`get_layer_kernels`:
residual add + RMSNorm, rotary embedding, SiLU-and-multiply).

- "torch": the PyTorch references everywhere (the models run their own code).
- "native": batchlm's C kernels on the CPU (kernels/cpu_layers.py over
  kernels/native/layers.c): decode attention reading the paged cache in
  place, fused add + RMSNorm, rotary, SiLU-and-multiply; the references for
  prefill attention. Needs the native library to build (a C compiler).
- "triton": the Triton kernels; on the CPU they run in Triton's interpreter,
  which needs TRITON_INTERPRET=1 in the environment before triton is imported.
- "auto" (the default): Triton on CUDA (AUTO_TRITON_ON_CUDA); on the CPU
  native where the library built (else the references, with the warning
  cpu_native logs), for float32 and bfloat16 models. The GPU tests (tests/gpu/) passed on an H100 on
  2026-11-26 (every kernel against its reference, greedy GPU == CPU in fp32,
  CUDA graphs on == off), and there the Triton decode attention took 335 us
  against the reference's 7396 (256 seqs x 1024 context, bf16): see README,
  GPUs. An fp8 KV cache keeps the reference attention under auto (the Triton
  attention does not read it).

`get_layer_kernels` returns None for the references: the models then run
their PyTorch code unchanged.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from batchlm.kernels import cpu_native
from batchlm.kernels.attention import TorchPagedAttention
from batchlm.kernels.cpu_layers import NATIVE_DTYPES, NativeLayerKernels, NativePagedAttention

ATTENTION_BACKENDS = ("auto", "torch", "triton", "native")


# Whether auto sends CUDA tensors to Triton: on since the GPU tests passed on an H100 (see above).
AUTO_TRITON_ON_CUDA = True

# KV-cache dtypes the Triton attention reads (an fp8 cache stays on the reference).
TRITON_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _use_triton(device: torch.device, name: str | None, cache_ok: bool = True) -> bool:
    """Whether `name` on `device` means the Triton kernels; raises ValueError
    when Triton is forced but cannot run here."""
    name = name or "auto"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    if name in ("torch", "native") or (name == "auto" and (not AUTO_TRITON_ON_CUDA or device.type != "cuda"
                                               or not cache_ok or not _triton_installed())):
        return False
    if not _triton_installed():
        raise ValueError("attention_backend='triton' needs the triton package: pip install 'batchlm[triton]'")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend='triton' on the CPU runs Triton's interpreter: set "
                         "TRITON_INTERPRET=1 in the environment before starting (or use "
                         "attention_backend='torch')")
    return True


def _native_lib(device: torch.device, name: str | None, dtype: torch.dtype | None = None):
    """The native library when `name` on `device` means the native CPU kernels (for a model
    computing in `dtype`, None: any), else None; raises ValueError when "native" is forced but
    cannot run here."""
    name = name or "auto"
    if name not in ("auto", "native"):
        return None
    if device.type != "cpu" or (dtype is not None and dtype not in NATIVE_DTYPES):
        if name == "native":
            got = f"{dtype} on {device.type}" if dtype is not None else device.type
            raise ValueError(f"attention_backend='native' runs on the CPU in float32 or bfloat16, not {got}")
        return None
    lib = cpu_native.library()
    if lib is None and name == "native":
        raise ValueError(f"attention_backend='native': the native CPU kernels are not available "
                         f"({cpu_native.unavailable_reason()})")
    return lib


def get_attention_backend(device: torch.device | str, name: str | None = None,
                          kv_cache_dtype: torch.dtype | None = None):
    """Return the paged-attention backend for `device`.

    name: None/"auto" picks Triton on CUDA (AUTO_TRITON_ON_CUDA, when triton
    is installed and the cache dtype is one it reads), the native kernels on
    the CPU (when they built), else the PyTorch reference; "torch", "triton"
    or "native" forces one.
    """
    device = torch.device(device)
    lib = _native_lib(device, name)
    if lib is not None:
        return NativePagedAttention(lib)
    triton_cache = kv_cache_dtype is None or kv_cache_dtype in TRITON_CACHE_DTYPES
    if name == "triton" and not triton_cache:
        raise ValueError(f"attention_backend='triton' reads KV caches in float32, bfloat16 or float16, "
                         f"not {kv_cache_dtype} (kv_cache_dtype); use attention_backend='auto' or 'torch'")
    if not _use_triton(device, name, triton_cache):
        return TorchPagedAttention()
    from batchlm.kernels.triton_attention import TritonPagedAttention

    return TritonPagedAttention(device)


def get_layer_kernels(device: torch.device | str, name: str | None = None, dtype: torch.dtype | None = None):
    """The fused layer kernels for `device` and a model computing in `dtype` under the same
    switch, or None: the models then run their own PyTorch code (see the module docstring)."""
    device = torch.device(device)
    lib = _native_lib(device, name, dtype)
    if lib is not None:
        return NativeLayerKernels(lib)
    if not _use_triton(device, name):
        return None
    from batchlm.kernels.triton_layers import TritonLayerKernels

    return TritonLayerKernels()


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None
