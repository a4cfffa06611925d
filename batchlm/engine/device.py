"""Device, dtype and memory planning for one engine.

dtype `auto`: bfloat16 on CPUs that compute it natively (AVX-512 BF16 or AMX
tiles, as PyTorch reports them: `torch.cpu._is_avx512_bf16_supported()`,
`_is_amx_tile_supported()`), float32 on other CPUs (oneDNN emulates bf16
there, slower than fp32); bfloat16 on GPUs that support it, else float16.
The flags decide, not a timing: a start-up timing on a shared machine could
pick differently from run to run, and so change outputs. Measured on a Zen 4
EPYC with AVX-512 BF16 (2026-11-25): bf16 matmuls ~2x fp32 and `bench
throughput` 1.97x; on an AVX2-only EPYC bf16 is emulated and slower.

`kv_cache_dtype` `auto` follows the model dtype; `fp8` (e4m3) needs CUDA.
The KV cache gets a byte budget: `kv_cache_memory` if
given, otherwise a quarter of physical memory on CPU (capped at 16 GiB), or
`gpu_memory_utilization` of free GPU memory after the weights are loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from batchlm.quantization.config import parse_quantization

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX-512 BF16 or AMX)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype `dtype="auto"` means on `device`."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_resources(config) -> tuple[torch.device, torch.dtype, torch.dtype]:
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} was asked for but CUDA is not available")
    dtype = auto_dtype(device) if config.dtype == "auto" else _DTYPES[config.dtype]
    _check_quantization(config, device)
    if config.kv_cache_dtype == "auto":
        kv_dtype = dtype
    elif config.kv_cache_dtype == "fp8":
        if device.type != "cuda":
            raise ValueError("kv_cache_dtype='fp8' needs a CUDA GPU; on the CPU use "
                             "'bfloat16' (half the bytes of float32) or 'auto'")
        kv_dtype = torch.float8_e4m3fn
    else:
        kv_dtype = _DTYPES[config.kv_cache_dtype]
    return device, dtype, kv_dtype


def _check_quantization(config, device: torch.device) -> None:
    qcfg = parse_quantization(config.quantization)
    if qcfg is None or qcfg.method != "fp8":
        return
    if device.type != "cuda":
        raise ValueError("quantization='fp8' needs a CUDA GPU with fp8 matmuls (compute "
                         "capability 8.9+: Ada, Hopper); on the CPU use 'int8' or 'int4'")
    if torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"quantization='fp8' needs compute capability 8.9+ (Ada, Hopper); "
                         f"{name} has {torch.cuda.get_device_capability(device)}")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 << 30


@dataclass(frozen=True)
class EngineResources:
    num_blocks: int
    max_num_batched_tokens: int

    @classmethod
    def plan(cls, config, device: torch.device, kv_dtype: torch.dtype, bytes_per_block: int) -> "EngineResources":
        if config.kv_cache_memory is not None:
            budget = config.kv_cache_memory
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * config.gpu_memory_utilization)
        else:
            budget = min(_physical_memory() // 4, 16 << 30)
        num_blocks = budget // bytes_per_block
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_memory={budget} bytes holds no KV block ({bytes_per_block} bytes each)")
        tokens = config.max_num_batched_tokens or (8192 if device.type == "cuda" else 2048)
        return cls(num_blocks=num_blocks, max_num_batched_tokens=tokens)
