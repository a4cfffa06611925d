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
    k_cache = torch.randn(backend.kv_cache_shape(num_blocks, bs, KVH, D), generator=g) * 1e4
    v_cache = torch.randn(k_cache.shape, generator=g) * 1e4
    # Scattered blocks from [32, 64), consecutive ones from 1 up (never block 0).
    perm = torch.randperm(num_blocks - 32, generator=g).add(32).tolist()
    next_free = 1
    # (past tokens already cached, new tokens this step): decodes first
    shapes = [(9, 1), (3, 1), (17, 1), (0, 7), (5, 6), (12, 1), (30, 1)]
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
        kk = torch.randn(n, KVH, D, generator=g)
        vv = torch.randn(n, KVH, D, generator=g)
        full_k.append(kk)
        full_v.append(vv)
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past)], dtype=torch.long)
        if past:
            k_cache.view(KVH, -1, D)[:, slots] = kk[:past].transpose(0, 1)
            v_cache.view(KVH, -1, D)[:, slots] = vv[:past].transpose(0, 1)
    qs, ks, vs, slots = [], [], [], []
    for (past, new), kk, vv, table in zip(shapes, full_k, full_v, tables):
        qs.append(torch.randn(new, H, D, generator=g))
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
        torch.testing.assert_close(out[start:start + new], ref, rtol=1e-4, atol=1e-5)
        start += new


def test_dispatch_rejects_unknown_backends():
    assert isinstance(get_attention_backend("cpu"), TorchPagedAttention)
    with pytest.raises(ValueError, match="attention backend"):
        get_attention_backend("cpu", "flash-something")
