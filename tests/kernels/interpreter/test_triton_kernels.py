"""The Triton paged-attention kernels under Triton's interpreter (the conftest
sets TRITON_INTERPRET=1) against the PyTorch reference, on fresh random
inputs each run: the seed is in every failure message."""
from __future__ import annotations

import os
import random

import pytest
import torch

from batchlm.config import EngineConfig
from batchlm.kernels import TorchPagedAttention, get_attention_backend, get_layer_kernels
from batchlm.kernels import triton_attention as ta
from batchlm.kernels.triton_layers import TritonLayerKernels

from tests.kernels.attention_steps import check, make_step, max_rel_err, random_lengths


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("G", [1, 3, 8])
def test_decode_matches_reference(G, bs, window):
    # Contexts 1 to beyond 1000, multiples of the block size and not, one
    # right at a split boundary (MIN_SPLIT_BLOCKS blocks) and one past it.
    split = ta.MIN_SPLIT_BLOCKS * bs
    ctxs = [1031, split + 1, split, bs, bs + 1, 2, 1] + random_lengths(2, 3, 300)
    check([(c - 1, 1) for c in ctxs], G, bs, torch.float32, window)


def test_every_tiling_of_the_decode_sweep_matches_reference():
    # `bench kernels --decode-sweep` picks DECODE_TILING among these on a GPU:
    # each must give the reference's output, with tiles smaller and larger
    # than a split and contexts that end mid-tile (interpreter, fp32).
    from batchlm.bench.kernels import KernelOptions, decode_sweep

    assert (None, ta.DECODE_TILING) in ta.DECODE_SWEEP
    assert len(set(ta.DECODE_SWEEP)) == len(ta.DECODE_SWEEP)
    o = KernelOptions(device="cpu", decode_seqs=2, decode_context=random_lengths(1, 520, 700)[0],
                      warmup=1, repeats=1)
    seed = random.SystemRandom().randrange(1 << 30)
    rows = decode_sweep(o, torch.device("cpu"), torch.float32, seed)
    assert [(r["split_blocks"], r["tiling"]) for r in rows] == [(s, t._asdict()) for s, t in ta.DECODE_SWEEP]
    assert {r["splits"] for r in rows} == {1, 2}  # under the interpreter auto = MIN_SPLIT_BLOCKS
    for r in rows:
        assert "error" not in r and r["rel_err"] < 1e-4, (seed, o.decode_context, r)


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
    # the layer kernels follow the same switch: None (the models' own code) under torch; auto on the CPU
    # gives the native kernels where they built (tests/kernels/test_cpu_layers.py)
    from batchlm.kernels import cpu_native
    assert get_layer_kernels("cpu", "torch") is None
    assert (get_layer_kernels("cpu") is None) == (cpu_native.library() is None)
    assert isinstance(get_layer_kernels("cuda", "auto"), TritonLayerKernels)  # auto: Triton on CUDA
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
    meta.graph_max_blocks = 64  # 4 splits of MIN_SPLIT_BLOCKS, where these contexts need at most 2
    meta.seq_lens_list = [1] * 3  # placeholders, as under capture: must not be read
    out = ta.TritonPagedAttention("cpu").forward(q, k, v, k_cache, v_cache, meta, 0.125, window)
    assert meta.derived[("triton_split", window)] == (4, ta.MIN_SPLIT_BLOCKS)
    assert max_rel_err(out, ref) < 1e-4, f"seed={seed}"
