"""Engine configuration: frozen dataclasses, validated at construction."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchlm.quantization.config import parse_quantization
from batchlm.speculative.config import parse_speculative_config

KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "fp8")


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (see engine/device.py)
    # auto: bfloat16 on CPUs that compute it natively (AVX-512 BF16 or AMX),
    # else float32; bfloat16 (float16 without bf16 support) on GPUs.
    kv_cache_dtype: str = "auto"  # auto: same as dtype; fp8 (e4m3): CUDA only
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_model_len: int | None = None  # None: the model's own limit (capped at 8192)
    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None  # per-step token budget; None: device default
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    kv_cache_memory: int | None = None  # bytes for the KV cache (CPU); None: device default
    gpu_memory_utilization: float = 0.9
    seed: int = 0
    # auto (Triton on CUDA, the references on the CPU) | torch | triton: Triton attention and layer kernels (kernels/dispatch.py)
    attention_backend: str = "auto"
    # None, "int8", "int8_dynamic", "int4", "int4_g32|64|128", "fp8", or a dict
    # {"method", "group_size", "lm_head"} (batchlm/quantization/config.py).
    quantization: str | dict[str, Any] | None = None
    # torch.compile the model's layers (attention stays eager): fused norms,
    # rotary and activations; costs ~10 s of compiling when the engine starts.
    compile_model: bool = False
    # False (vLLM's default): on CUDA with the Triton attention (auto or triton), decode steps replay CUDA
    # graphs captured per batch-size bucket (engine/cuda_graphs.py; tested on an H100).
    # True: always eager. No effect on the CPU, with the reference attention or compile_model.
    enforce_eager: bool = False
    # None, or {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": a,
    # "prompt_lookup_max": b} / {"method": "draft", "model": ..., "num_speculative_tokens": k}
    # (batchlm/speculative/config.py).
    speculative_config: dict[str, Any] | None = None

    def __post_init__(self):
        def bad(name, allowed):
            raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad("dtype", "one of auto, float32, bfloat16, float16")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            bad("kv_cache_dtype", "one of " + ", ".join(KV_CACHE_DTYPES))
        if self.max_model_len is not None and self.max_model_len < 1:
            bad("max_model_len", ">= 1")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", ">= 1")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", ">= 1")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            bad("block_size", "a power of two")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            bad("kv_cache_memory", "> 0 bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            bad("gpu_memory_utilization", "in (0, 1]")
        # NOTE: imported here, not at the top: batchlm.kernels imports torch, and this module
        # must not (tests/speculative/test_ngram.py checks that importing it leaves torch out).
        from batchlm.kernels.dispatch import ATTENTION_BACKENDS

        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", "one of " + ", ".join(ATTENTION_BACKENDS))
        parse_quantization(self.quantization)  # raises ValueError naming the field
        parse_speculative_config(self.speculative_config)  # likewise
