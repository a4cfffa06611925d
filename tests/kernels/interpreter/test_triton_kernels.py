"""The Triton paged-attention kernels under Triton's interpreter (the conftest
sets TRITON_INTERPRET=1) against the PyTorch reference, on fresh random
inputs each run: the seed is in every failure message."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from batchlm.config import EngineConfig
from batchlm.kernels import AttentionMetadata, TorchPagedAttention, get_attention_backend, get_layer_kernels
from batchlm.kernels import triton_attention as ta
from batchlm.kernels.triton_layers import TritonLayerKernels

D = 32


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def max_rel_err(out, ref):
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def make_step(shapes, G, bs, dtype, seed, KVH=None):
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
    return q, k, v, k_cache, v_cache, meta


def run_both(shapes, G, bs, dtype, window, seed):
    """The reference's forward, and the Triton kernels launched one by one
    into a NaN-filled output. Returns (ref, out, ref caches, triton caches)."""
    q, k, v, k_cache, v_cache, meta = make_step(shapes, G, bs, dtype, seed)
    scale = 1 / math.sqrt(D)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = TorchPagedAttention().forward(q, k, v, ref_k, ref_v, meta, scale, window)
    ta.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    out = torch.full_like(q, float("nan"))
    nd, S = meta.num_decodes, len(shapes)
    if nd:
        splits = ta.decode_splits(meta.seq_lens_list[:nd], bs, window)
        ta.paged_decode(q[:nd], k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window, out[:nd], splits)
    if S > nd:
        ta.paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, nd,
                         S - nd, max(meta.query_lens_list[nd:]), scale, window, out)
    return ref, out, (ref_k, ref_v), (k_cache, v_cache)


def check(shapes, G, bs, dtype, window):
    seed = random.SystemRandom().randrange(1 << 30)
    ref, out, ref_cache, cache = run_both(shapes, G, bs, dtype, window, seed)
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


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("G", [1, 3, 8])
def test_decode_matches_reference(G, bs, window):
    # Contexts 1 to beyond 1000, multiples of the block size and not, one
    # right at a split boundary (SPLIT_BLOCKS blocks) and one past it.
    split = ta.SPLIT_BLOCKS * bs
    ctxs = [1031, split + 1, split, bs, bs + 1, 2, 1] + random_lengths(2, 3, 300)
    check([(c - 1, 1) for c in ctxs], G, bs, torch.float32, window)


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("G", [1, 3, 8])
def test_prefill_and_chunked_prefill_match_reference(G, bs, window):
    # A step of decodes and chunks: chunks with no cached prefix, after a
    # cached prefix (chunked prefill / prefix-cache hit), several tokens to
    # verify (speculative), over 1000 cached tokens, odd lengths.
    shapes = [(20, 1), (0, 37), (1001, 3), (bs, 17), (5, 1 + random_lengths(1, 1, 20)[0]),
              (random_lengths(1, 1, 200)[0], 2)]
    check(shapes, G, bs, torch.float32, window)


@pytest.mark.parametrize("window", [None, 24])
def test_bfloat16_step_matches_reference(window):
    check([(1030, 1), (47, 1), (0, 21), (33, 18)], 3, 16, torch.bfloat16, window)


def test_forward_is_the_kernels_and_matches_reference():
    seed = random.SystemRandom().randrange(1 << 30)
    q, k, v, k_cache, v_cache, meta = make_step([(300, 1), (7, 1), (40, 9), (0, 5)], 3, 16, torch.float32, seed)
    ref = TorchPagedAttention().forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.125, 13)
    backend = get_attention_backend("cpu", "triton")
    assert isinstance(backend, ta.TritonPagedAttention)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.125, 13)
    assert max_rel_err(out, ref) < 1e-4, f"seed={seed}"


def test_dispatch(monkeypatch):
    with pytest.raises(ValueError, match="attention_backend must be one of auto, torch, triton"):
        EngineConfig(attention_backend="flash")
    assert isinstance(get_attention_backend("cpu"), TorchPagedAttention)
    assert isinstance(get_attention_backend("cpu", "torch"), TorchPagedAttention)
    # an fp8 cache: auto keeps the reference even on CUDA; forcing triton names the problem
    assert isinstance(get_attention_backend("cuda", "auto", torch.float8_e4m3fn), TorchPagedAttention)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        get_attention_backend("cpu", "triton", torch.float8_e4m3fn)
    # the layer kernels follow the same switch: None (the models' own code) unless Triton is chosen
    assert get_layer_kernels("cpu") is None and get_layer_kernels("cpu", "torch") is None
    assert get_layer_kernels("cuda", "auto") is None  # AUTO_TRITON_ON_CUDA stays off until a GPU run
    assert isinstance(get_layer_kernels("cpu", "triton"), TritonLayerKernels)
    with pytest.raises(ValueError, match="attention backend"):
        get_layer_kernels("cpu", "flash")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_attention_backend("cpu", "triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_layer_kernels("cpu", "triton")
    assert os.environ.get("TRITON_INTERPRET") is None


def test_backend_refuses_shapes_it_cannot_run():
    with pytest.raises(ValueError, match="block_size in"):
        ta.TritonPagedAttention.kv_cache_shape(64, 8, 2, 64)
    with pytest.raises(ValueError, match="head_dim >= 16"):
        ta.TritonPagedAttention.kv_cache_shape(64, 16, 2, 8)


@pytest.mark.parametrize("window", [None, 13])
def test_graph_capture_bound_gives_the_same_decode(window):
    # Under a CUDA graph the decode launches as many splits as graph_max_blocks
    # needs (host lengths are placeholders then): the extra splits are empty
    # and must not change the result.
    seed = random.SystemRandom().randrange(1 << 30)
    q, k, v, k_cache, v_cache, meta = make_step([(300, 1), (7, 1), (0, 1)], 3, 16, torch.float32, seed)
    ref = TorchPagedAttention().forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.125, window)
    meta.graph_max_blocks = 64  # 4 splits of SPLIT_BLOCKS, where these contexts need at most 2
    meta.seq_lens_list = [1] * 3  # placeholders, as under capture: must not be read
    out = ta.TritonPagedAttention("cpu").forward(q, k, v, k_cache, v_cache, meta, 0.125, window)
    assert meta.derived[("triton_splits", window)] == -(-64 // ta.SPLIT_BLOCKS)
    assert max_rel_err(out, ref) < 1e-4, f"seed={seed}"
