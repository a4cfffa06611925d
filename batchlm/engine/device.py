"""Device, dtype and memory planning for one engine.

dtype `auto`: float32 on CPUs (no native bf16 arithmetic assumed), bfloat16 on
GPUs that support it. The KV cache gets a byte budget: `kv_cache_memory` if
given, otherwise a quarter of physical memory on CPU (capped at 16 GiB), or
`gpu_memory_utilization` of free GPU memory after the weights are loaded.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_resources(config) -> tuple[torch.device, torch.dtype, torch.dtype]:
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={config.device!r} was asked for but CUDA is not available")
    if config.dtype == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = _DTYPES[config.dtype]
    kv_dtype = dtype if config.kv_cache_dtype == "auto" else _DTYPES[config.kv_cache_dtype]
    return device, dtype, kv_dtype


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
