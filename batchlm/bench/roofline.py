"""The matmul roofline: how many FLOP/s this machine can do, and how many a
workload needed.

Contract:
- `linear_params(config)` counts the weights of the decoder layers' linear
  maps (q, k, v, o, gate, up, down) from an HF config (object or dict);
  `lm_head_params(config)` is vocab × hidden. Norms, biases and embeddings are
  not counted. Nothing here looks at the engine's modules.
- `workload_flops` = 2 × linear × prompt tokens + 2 × (linear + LM head) ×
  generated tokens (the definition in the issue; a prompt token served from
  the prefix cache still counts).
- `matmul_gflops(dtype=None)` times an n×n×n torch.matmul on all threads in
  `dtype` (float32 by default; the benches pass the dtype the engine computes
  in, e.g. bfloat16 under dtype="auto" or with int8/int4 weights): a few
  warm-ups, then the median of several runs, in GFLOP/s.
"""
from __future__ import annotations

import statistics
import time


def _get(config, name, default=None):
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _text_config(config):
    # Multimodal configs keep the language model under text_config.
    inner = _get(config, "text_config")
    return inner if inner is not None else config


def linear_params(config) -> int:
    """Weights of all q/k/v/o/gate/up/down projections of all decoder layers."""
    c = _text_config(config)
    hidden = _get(c, "hidden_size")
    n_heads = _get(c, "num_attention_heads")
    n_kv = _get(c, "num_key_value_heads") or n_heads
    head_dim = _get(c, "head_dim") or hidden // n_heads
    inter = _get(c, "intermediate_size")
    layers = _get(c, "num_hidden_layers")
    q = hidden * n_heads * head_dim
    kv = 2 * hidden * n_kv * head_dim
    o = n_heads * head_dim * hidden
    mlp = 3 * hidden * inter
    return layers * (q + kv + o + mlp)


def lm_head_params(config) -> int:
    c = _text_config(config)
    return _get(c, "vocab_size") * _get(c, "hidden_size")


def workload_flops(config, prompt_tokens: int, generated_tokens: int) -> float:
    lin = linear_params(config)
    return 2.0 * lin * prompt_tokens + 2.0 * (lin + lm_head_params(config)) * generated_tokens


def matmul_gflops(n: int = 2048, warmup: int = 3, repeats: int = 7, dtype=None) -> float:
    """Dense n×n×n matmul rate of this machine in `dtype` (default float32),
    median of `repeats`."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9
