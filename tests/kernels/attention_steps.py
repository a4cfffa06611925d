"""Paged-attention steps for the kernel tests (interpreter and GPU): random
caches and metadata, the Triton kernels launched one by one into NaN-filled
outputs, and the comparison with the PyTorch reference (fp32: 1e-4 max
relative; bf16/fp16: 1e-2 relative norm). `device` picks where they run.
`seeded()` and `assert_close()` serve the layer-kernel tests too (same seeds, same tolerances)."""
from __future__ import annotations

import math
import random

import torch

from batchlm.kernels import AttentionMetadata, TorchPagedAttention
from batchlm.kernels import triton_attention as ta

D = 32


def seeded():
    """(seed, generator): a fresh seed per call, printed by the test that fails."""
    seed = random.SystemRandom().randrange(1 << 30)
    return seed, torch.Generator().manual_seed(seed)


def assert_close(out, ref, dtype, why):
    """Fully written (no NaN left from the poisoned output), then fp32 1e-4 max relative, else 1e-2 norm."""
    assert not out.isnan().any(), f"output not fully written: {why}"
    if dtype == torch.float32:
        err = max_rel_err(out, ref)
        assert err < 1e-4, f"max relative error {err}: {why}"
    else:
        err = rel_err(out, ref)
        assert err < 1e-2, f"relative norm error {err}: {why}"


def rms_norm_case(dim, dtype, residual, N, g, device="cpu"):
    """A random fused add + RMSNorm case: (norm, x, residual or None, the summed input, the model's output)."""
    from batchlm.models.llama import RMSNorm

    norm = RMSNorm(dim, 1e-5).to(dtype).to(device)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=g) * 0.5 + 1)
    x = torch.randn(N, dim, generator=g).to(dtype).to(device)
    res = torch.randn(N, dim, generator=g).to(dtype).to(device) if residual else None
    ref_res = x + res if residual else x
    with torch.no_grad():
        ref = norm(ref_res)
    return norm, x, res, ref_res, ref


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def max_rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def make_step(shapes, G, bs, dtype, seed, KVH=None, device="cpu"):
    """A step of (past, new) token counts per sequence, decodes (new == 1) first.

    Returns q, k, v, k_cache, v_cache, meta. The cache holds each sequence's
    past tokens in scattered blocks; every other slot holds finite garbage
    (see the NOTE in TorchPagedAttention)."""
    g = torch.Generator().manual_seed(seed)
    KVH = KVH or (1 if G == 8 else 2)
    H = KVH * G
    need = sum(-(-(p + n) // bs) for p, n in shapes)
    num_blocks = need + 8
    k_cache = (torch.randn(KVH, num_blocks, bs, D, generator=g) * 100).to(dtype)
    v_cache = (torch.randn(KVH, num_blocks, bs, D, generator=g) * 100).to(dtype)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # never block 0 (table padding)
    tables, slots = [], []
    for past, new in shapes:
        table = [perm.pop() for _ in range(-(-(past + new) // bs))]
        tables.append(table)
        if past:
            pslots = torch.tensor([table[p // bs] * bs + p % bs for p in range(past)])
            k_cache.view(KVH, -1, D)[:, pslots] = torch.randn(KVH, past, D, generator=g).to(dtype)
            v_cache.view(KVH, -1, D)[:, pslots] = torch.randn(KVH, past, D, generator=g).to(dtype)
        slots += [table[p // bs] * bs + p % bs for p in range(past, past + new)]
    T = sum(n for _, n in shapes)
    q = torch.randn(T, H, D, generator=g).to(dtype)
    # k, v as strided views, as the model passes them (split out of one tensor)
    kv = torch.randn(T, 2 * KVH, D, generator=g).to(dtype)
    k, v = kv.split([KVH, KVH], dim=1)
    width = max(len(t) for t in tables)
    qlens = [n for _, n in shapes]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        seq_lens=torch.tensor([p + n for p, n in shapes]),
        query_start_loc=torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist()),
        num_decodes=next((i for i, n in enumerate(qlens) if n != 1), len(qlens)),  # leading one-token sequences
        seq_lens_list=[p + n for p, n in shapes], query_lens_list=qlens, block_size=bs)
    if device != "cpu":
        q, k_cache, v_cache = (t.to(device) for t in (q, k_cache, v_cache))
        k, v = kv.to(device).split([KVH, KVH], dim=1)  # still strided views
        meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc = (
            t.to(device) for t in (meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc))
    return q, k, v, k_cache, v_cache, meta


def run_both(shapes, G, bs, dtype, window, seed, device="cpu"):
    """The reference's forward, and the Triton kernels launched one by one
    into a NaN-filled output. Returns (ref, out, ref caches, triton caches)."""
    q, k, v, k_cache, v_cache, meta = make_step(shapes, G, bs, dtype, seed, device=device)
    scale = 1 / math.sqrt(D)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = TorchPagedAttention().forward(q, k, v, ref_k, ref_v, meta, scale, window)
    ta.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    nd, S = meta.num_decodes, len(shapes)
    if nd:
        # split as finely as allowed, so that the merge of partial softmaxes runs
        split = ta.decode_split(ta.attended_blocks(meta.seq_lens_list[:nd], bs, window), nd, k_cache.shape[0], None)
        ta.paged_decode(q[:nd], k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window, out[:nd], split)
    if S > nd:
        ta.paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, nd,
                         S - nd, max(meta.query_lens_list[nd:]), scale, window, out)
    return ref, out, (ref_k, ref_v), (k_cache, v_cache)


def check(shapes, G, bs, dtype, window, device="cpu"):
    seed = random.SystemRandom().randrange(1 << 30)
    ref, out, ref_cache, cache = run_both(shapes, G, bs, dtype, window, seed, device)
    why = f"seed={seed} shapes={shapes} G={G} bs={bs} window={window}"
    assert not out.isnan().any(), f"output not fully written: {why}"
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1]), f"cache write: {why}"
    if dtype == torch.float32:
        assert max_rel_err(out, ref) < 1e-4, why
    else:
        assert rel_err(out, ref) < 1e-2, why


def random_lengths(n, lo, hi):
    rnd = random.SystemRandom()
    return [rnd.randrange(lo, hi) for _ in range(n)]
