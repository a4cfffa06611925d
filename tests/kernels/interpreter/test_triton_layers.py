"""The Triton layer kernels (fused residual add + RMSNorm, rotary embedding,
SiLU-and-multiply) under Triton's interpreter against the models' own
PyTorch code, on fresh random inputs (the seed is in every failure message)
written into NaN-filled outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from batchlm.kernels import triton_layers as tk
from batchlm.models.rope import RotaryEmbedding
from tests.kernels.attention_steps import assert_close, rms_norm_case, seeded

DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dim", [64, 576, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_matches_model(dtype, dim, residual):
    seed, g = seeded()
    norm, x, res, ref_res, ref = rms_norm_case(dim, dtype, residual, 7, g)
    out = torch.full_like(x, float("nan"))
    tk.add_rms_norm(x, res, norm.weight.data, 1e-5, out)
    why = f"seed={seed} dim={dim} residual={residual}"
    assert_close(out, ref, dtype, why)
    if residual and dtype == torch.float32:
        assert torch.equal(res, ref_res), f"residual update: {why}"
    elif residual:  # the interpreter rounds float32 -> bfloat16 toward zero (a GPU to nearest): 1 ulp
        torch.testing.assert_close(res, ref_res, rtol=2 ** -7, atol=0, msg=f"residual update: {why}")


ROPES = {
    "default": {},
    "partial": dict(partial_rotary_factor=0.5),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
}


@pytest.mark.parametrize("rope", list(ROPES))
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_matches_model(dtype, rope):
    seed, g = seeded()
    D, heads, T = 32, 5, 9
    config = LlamaConfig(hidden_size=heads * D, num_attention_heads=heads, max_position_embeddings=256,
                         **ROPES[rope])
    emb = RotaryEmbedding(config, D, dtype)
    positions = torch.randint(0, 256, (T,), generator=g)
    # a strided view, as the model passes it (queries split out of q/k/v heads)
    x = torch.randn(T, heads + 2, D, generator=g).to(dtype)[:, :heads]
    ref = emb.apply(x, *emb.lookup(positions))
    out = torch.full_like(ref, float("nan"))
    tk.rotary(x, positions, emb.cos, emb.sin, out)
    assert_close(out, ref, dtype, f"seed={seed} rope={rope} rot_dim={emb.rot_dim}")


@pytest.mark.parametrize("inter", [128, 1536, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_model(dtype, inter):
    seed, g = seeded()
    gate_up = (torch.randn(6, 2 * inter, generator=g) * 3).to(dtype)
    gate, up = gate_up.split(inter, dim=-1)
    ref = F.silu(gate) * up  # models.llama.MLP
    out = torch.full((6, inter), float("nan"), dtype=dtype)
    tk.silu_and_mul(gate_up, out)
    assert_close(out, ref, dtype, f"seed={seed} inter={inter}")
