"""Each Triton kernel on a CUDA device against its PyTorch reference (also on
the device): fresh random inputs each run (the seed is in every failure
message), outputs filled with NaN before the call, fp32 within 1e-4 max
relative error, bf16 within 1e-2 relative norm. Skipped without CUDA.

Passed on an H100 (torch 2.11, triton 3.6), 2026-11-26 (see README, GPUs).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

if torch.cuda.is_available():  # triton compiles for the device here (never its interpreter)
    from batchlm.kernels import triton_layers as tk
    from batchlm.models.rope import RotaryEmbedding
    from tests.kernels.attention_steps import assert_close, check, random_lengths, rms_norm_case, seeded

CUDA = "cuda"
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("G", [1, 3, 8])
def test_decode_on_cuda(G, bs, window, dtype):
    split = 16 * bs
    ctxs = [1031, split + 1, split, bs, bs + 1, 2, 1] + random_lengths(5, 3, 3000)
    check([(c - 1, 1) for c in ctxs], G, bs, dtype, window, device=CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("G", [1, 3, 8])
def test_prefill_and_chunked_prefill_on_cuda(G, bs, window, dtype):
    shapes = [(20, 1), (0, 37), (1001, 3), (bs, 17), (5, 1 + random_lengths(1, 1, 20)[0]),
              (random_lengths(1, 1, 200)[0], 2), (0, 300), (700, 129)]
    check(shapes, G, bs, dtype, window, device=CUDA)


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dim", [576, 4096, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_on_cuda(dtype, dim, residual):
    seed, g = seeded()
    norm, x, res, ref_res, ref = rms_norm_case(dim, dtype, residual, 33, g, CUDA)
    out = torch.full_like(x, float("nan"))
    tk.add_rms_norm(x, res, norm.weight.data, 1e-5, out)
    why = f"seed={seed} dim={dim} residual={residual}"
    assert_close(out, ref, dtype, why)
    if residual:  # round to nearest on a GPU: the same sum as torch's
        assert torch.equal(res, ref_res), f"residual update: {why}"


@pytest.mark.parametrize("rope", ["default", "partial", "llama3"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_cuda(dtype, rope):
    seed, g = seeded()
    extra = {"default": {}, "partial": dict(partial_rotary_factor=0.5),
             "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64})}
    D, heads, T = 128, 12, 65
    config = LlamaConfig(hidden_size=heads * D, num_attention_heads=heads, max_position_embeddings=4096,
                         **extra[rope])
    emb = RotaryEmbedding(config, D, dtype)
    positions = torch.randint(0, 4096, (T,), generator=g).to(CUDA)
    x = torch.randn(T, heads + 4, D, generator=g).to(dtype).to(CUDA)[:, :heads]  # strided, as in the model
    ref = emb.apply(x, *emb.lookup(positions))
    out = torch.full_like(ref, float("nan"))
    tk.rotary(x, positions, *emb.tables(x.device), out)
    assert_close(out, ref, dtype, f"seed={seed} rope={rope}")


@pytest.mark.parametrize("inter", [1536, 14336, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_on_cuda(dtype, inter):
    seed, g = seeded()
    gate_up = (torch.randn(17, 2 * inter, generator=g) * 3).to(dtype).to(CUDA)
    gate, up = gate_up.split(inter, dim=-1)
    ref = F.silu(gate) * up
    out = torch.full((17, inter), float("nan"), dtype=dtype, device=CUDA)
    tk.silu_and_mul(gate_up, out)
    assert_close(out, ref, dtype, f"seed={seed} inter={inter}")


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("G", [1, 3])
def test_fp8_kv_cache_reads_as_its_bf16_values_on_cuda(G, window):
    """kv_cache_dtype="fp8" stays on the PyTorch reference: a step over an e4m3
    cache (writes included) equals the same step over a bf16 cache holding the
    same e4m3-rounded values, decodes and prefill chunks; the written slots
    hold the new keys rounded to e4m3."""
    from batchlm.kernels.attention import TorchPagedAttention
    from tests.kernels.attention_steps import make_step

    seed, _ = seeded()
    shapes = [(c - 1, 1) for c in (1031, 300, 17, 2, 1)] + [(0, 37), (1001, 3), (20, 129)]
    q, k, v, kc, vc, meta = make_step(shapes, G, 16, torch.bfloat16, seed, device=CUDA)
    kc, vc = (c.clamp(-400, 400) for c in (kc, vc))  # e4m3 holds |x| <= 448
    fp8 = torch.float8_e4m3fn
    k8, v8 = kc.to(fp8), vc.to(fp8)
    kb, vb = k8.to(torch.bfloat16), v8.to(torch.bfloat16)
    # the bf16 twin gets keys/values already rounded to e4m3, so both caches hold the same values
    kr, vr = k.to(fp8).to(torch.bfloat16), v.to(fp8).to(torch.bfloat16)
    scale = 0.125
    out8 = TorchPagedAttention().forward(q, kr, vr, k8, v8, meta, scale, window)  # a first chunk reads k itself
    ref = TorchPagedAttention().forward(q, kr, vr, kb, vb, meta, scale, window)
    why = f"seed={seed} G={G} window={window}"
    assert out8.dtype == torch.bfloat16, why
    assert_close(out8, ref, torch.bfloat16, why)
    slots = meta.slot_mapping
    KVH = kc.shape[0]
    assert torch.equal(k8.view(KVH, -1, 32)[:, slots].to(torch.bfloat16), kr.transpose(0, 1)), why
    assert torch.equal(v8.view(KVH, -1, 32)[:, slots].to(torch.bfloat16), vr.transpose(0, 1)), why
