"""The PyTorch paged-attention reference against plain dense causal attention,
on fresh random inputs with scattered (non-contiguous) blocks, consecutive
blocks (read in place, no gather) and a mix of both."""
from __future__ import annotations

import math

import pytest
import torch

from batchlm.kernels import AttentionMetadata, TorchPagedAttention, get_attention_backend


def dense_attention(q, k, v, scale, window=None):
    # q: [Q, H, D] for the last Q positions of k, v: [L, KVH, D]; window: see the contract
    Q, H, D = q.shape
    L, KVH, _ = k.shape
    g = H // KVH
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q.double(), k.double()) * scale
    qpos = torch.arange(L - Q, L)[:, None]
    kpos = torch.arange(L)[None, :]
    scores = scores.masked_fill(kpos > qpos, float("-inf"))
    if window is not None:
        scores = scores.masked_fill(kpos <= qpos - window, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("layout", ["scattered", "consecutive", "mixed"])
@pytest.mark.parametrize("window", [None, 5, 13])
@pytest.mark.parametrize("group_tokens,query_block", [(8192, 128), (8, 4)])
@pytest.mark.parametrize("H,KVH,D", [(4, 4, 16), (8, 2, 32), (9, 3, 64)])
def test_mixed_decode_and_prefill_step_matches_dense(H, KVH, D, group_tokens, query_block, window, layout):
    check_step(H, KVH, D, group_tokens, query_block, window, layout, torch.float32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["scattered", "consecutive", "mixed"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("group_tokens", [8192, 8])
def test_bfloat16_cache_step_matches_dense(group_tokens, window, layout):
    # bf16 cache and activations (dtype="auto" on CPUs with native bf16). The
    # reference attends over the same bf16-rounded q, k, v in float64, so the
    # tolerance covers only the kernel's own rounding (bf16 output: 2^-8).
    check_step(9, 3, 64, group_tokens, 128, window, layout, torch.bfloat16, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("layout", ["scattered", "consecutive"])
def test_batch_one_decode_matches_dense(dtype, window, layout):
    # One sequence decoding alone (the batch-1 branch of _decode: in place,
    # or for a bf16 cache gathered and computed in float32).
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    check_step(9, 3, 64, 8192, 128, window, layout, dtype, shapes=[(37, 1)], **tol)


def check_step(H, KVH, D, group_tokens, query_block, window, layout, dtype, rtol, atol, shapes=None):
    # group_tokens 8: every decode in a group of its own; query_block 4: prefill
    # chunks split into several query blocks, the last one partial.
    # layout: each sequence's blocks scattered, or consecutive ids (a decode
    # alone in its group and a prefill with cached tokens then read the cache
    # in place), or consecutive for every other sequence.
    g = torch.Generator().manual_seed(H * 100 + D)
    bs, num_blocks = 4, 64
    backend = TorchPagedAttention()
    backend.GROUP_TOKENS = group_tokens
    backend.PREFILL_QUERY_BLOCK = query_block
    # Poison: slots never written hold large garbage (finite: see the NOTE in
    # TorchPagedAttention), so reading one would show.
    k_cache = (torch.randn(backend.kv_cache_shape(num_blocks, bs, KVH, D), generator=g) * 1e4).to(dtype)
    v_cache = (torch.randn(k_cache.shape, generator=g) * 1e4).to(dtype)
    # Scattered blocks from [32, 64), consecutive ones from 1 up (never block 0).
    perm = torch.randperm(num_blocks - 32, generator=g).add(32).tolist()
    next_free = 1
    # (past tokens already cached, new tokens this step): decodes first
    shapes = shapes or [(9, 1), (3, 1), (17, 1), (0, 7), (5, 6), (12, 1), (30, 1)]
    shapes = [s for s in shapes if s[1] > 1 or s[0] > 0]
    shapes.sort(key=lambda s: s[1] != 1)
    full_k, full_v, tables = [], [], []
    for idx, (past, new) in enumerate(shapes):
        n = past + new
        nb = -(-n // bs)
        if layout == "consecutive" or (layout == "mixed" and idx % 2 == 0):
            table = list(range(next_free, next_free + nb))
            next_free += nb
            assert next_free <= 32
        else:
            table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        kk = torch.randn(n, KVH, D, generator=g).to(dtype)
        vv = torch.randn(n, KVH, D, generator=g).to(dtype)
        full_k.append(kk)
        full_v.append(vv)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past)], dtype=torch.long)
        if past:
            k_cache.view(KVH, -1, D)[:, slots] = kk[:past].transpose(0, 1)
            v_cache.view(KVH, -1, D)[:, slots] = vv[:past].transpose(0, 1)
    qs, ks, vs, slots = [], [], [], []
    for (past, new), kk, vv, table in zip(shapes, full_k, full_v, tables):
        qs.append(torch.randn(new, H, D, generator=g).to(dtype))
        ks.append(kk[past:])
        vs.append(vv[past:])
        slots += [table[p // bs] * bs + p % bs for p in range(past, past + new)]
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        seq_lens=torch.tensor([p + n for p, n in shapes]),
        query_start_loc=torch.tensor([0] + list(torch.cumsum(torch.tensor([n for _, n in shapes]), 0))),
        num_decodes=sum(1 for _, n in shapes if n == 1),
        seq_lens_list=[p + n for p, n in shapes], query_lens_list=[n for _, n in shapes], block_size=bs,
        block_tables_list=None if layout == "scattered" else tables)
    scale = 1 / math.sqrt(D)
    out = backend.forward(torch.cat(qs), torch.cat(ks), torch.cat(vs), k_cache, v_cache, meta, scale, window)
    start = 0
    for (past, new), q, kk, vv in zip(shapes, qs, full_k, full_v):
        ref = dense_attention(q, kk, vv, scale, window)
        assert out.dtype == dtype
        torch.testing.assert_close(out[start:start + new].float(), ref, rtol=rtol, atol=atol)
        start += new


def test_dispatch_rejects_unknown_backends():
    assert isinstance(get_attention_backend("cpu"), TorchPagedAttention)
    with pytest.raises(ValueError, match="attention backend"):
        get_attention_backend("cpu", "flash-something")
