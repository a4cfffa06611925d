"""The native CPU kernels of a decode step's small ops (kernels/native/layers.c via
kernels/cpu_layers.py) against their PyTorch references, for each build variant
(this CPU's, AVX2, plain C), on fresh random inputs with outputs poisoned (NaN)
first; and how dispatch picks them."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from batchlm.kernels import AttentionMetadata, TorchPagedAttention, cpu_native, dispatch
from batchlm.kernels.cpu_layers import NativeLayerKernels, NativePagedAttention
from tests.kernels.attention_steps import D, assert_close, make_step, rms_norm_case, seeded
from tests.kernels.test_cpu_native import MARCHES, needs_cc, native_off  # noqa: F401 (fixture)

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    out = tmp_path_factory.mktemp("native")
    return {march: cpu_native.NativeLib(cpu_native.build(out, march=march)) for march in MARCHES}


def _into_poisoned(shape, dtype, call):
    """call(out) into an output filled with NaN first (assert_close then sees any entry left unwritten)."""
    out = torch.full(shape, float("nan"), dtype=dtype)
    call(out)
    return out


def _lengths(n, lo, hi):
    rnd = random.SystemRandom()
    return [rnd.randrange(lo, hi) for _ in range(n)]


# (past, new) per sequence: one decode; a batch of decodes of mixed lengths (blocks scattered by
# make_step, so never consecutive); decodes then prompt chunks (after cached tokens, and a first chunk).
STEPS = {
    "one": lambda: [(_lengths(1, 1, 300)[0], 1)],
    "batch": lambda: [(p, 1) for p in _lengths(6, 0, 200)],
    "mixed": lambda: [(p, 1) for p in _lengths(3, 1, 100)] + [(40, 17), (0, 9)],
    "prefill": lambda: [(0, _lengths(1, 2, 90)[0]), (_lengths(1, 1, 60)[0], 33)],
}


@needs_cc
@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize("G,bs,window", [(1, 16, None), (3, 16, None), (8, 5, None), (3, 16, 37)])
def test_paged_decode_matches_reference(libs, march, dtype, cache_dtype, step, G, bs, window):
    shapes = STEPS[step]()
    seed, _ = seeded()
    why = f"seed={seed} shapes={shapes} G={G} bs={bs} window={window} {march}"
    q, k, v, k_cache, v_cache, meta = make_step(shapes, G, bs, cache_dtype, seed)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = 1 / math.sqrt(D)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = TorchPagedAttention().forward(q, k, v, ref_k, ref_v, meta, scale, window)
    out = NativePagedAttention(libs[march]).forward(q, k, v, k_cache, v_cache, meta, scale, window)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v), f"cache write: {why}"
    assert_close(out, ref, dtype if cache_dtype == dtype else torch.bfloat16, why)
    # the kernel itself, on every row (prompt rows too, which the backend leaves to the reference), writes
    # every element of its output (poisoned first); the decode rows are the backend's bits
    poisoned = _into_poisoned(q.shape, dtype, lambda o: libs[march].paged_attention(
        q, None, None, None, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, o, scale,
        window))
    assert_close(poisoned, ref, dtype if cache_dtype == dtype else torch.bfloat16, why)
    nd = meta.num_decodes
    assert torch.equal(poisoned[:nd], out[:nd]), why


@needs_cc
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_decode_row_does_not_depend_on_its_batch(dtype):
    """The same decode rows attended alone or among others: the same bits (one code path per row)."""
    lib = cpu_native.library()
    if lib is None:
        pytest.skip(cpu_native.unavailable_reason())
    seed, _ = seeded()
    shapes = [(p, 1) for p in _lengths(5, 1, 150)]
    q, k, v, k_cache, v_cache, meta = make_step(shapes, 3, 16, dtype, seed)
    scale = 1 / math.sqrt(D)
    both = NativePagedAttention(lib).forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, scale)
    for b in range(len(shapes)):
        one = AttentionMetadata(
            slot_mapping=meta.slot_mapping[b:b + 1], block_tables=meta.block_tables[b:b + 1],
            seq_lens=meta.seq_lens[b:b + 1], query_start_loc=torch.tensor([0, 1]), num_decodes=1,
            seq_lens_list=meta.seq_lens_list[b:b + 1], query_lens_list=[1], block_size=16)
        alone = NativePagedAttention(lib).forward(q[b:b + 1], k[b:b + 1], v[b:b + 1], k_cache.clone(),
                                                  v_cache.clone(), one, scale)
        assert torch.equal(alone, both[b:b + 1]), f"seed={seed} shapes={shapes} row {b}"


@needs_cc
@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dim,N", [(64, 1), (576, 3), (100, 20)])
def test_add_rms_norm_matches_model(libs, march, dtype, residual, dim, N):
    seed, g = seeded()
    norm, x, res, ref_res, ref = rms_norm_case(dim, dtype, residual, N, g)
    out = _into_poisoned(x.shape, dtype, lambda o: libs[march].add_rms_norm(x, res, norm.weight.data, o, norm.eps))
    why = f"seed={seed} dim={dim} N={N} {march}"
    if residual:
        assert torch.equal(res, ref_res), f"residual stream: {why}"  # one rounded add, as torch's
    assert_close(out, ref, dtype, why)
    got, stream = NativeLayerKernels(libs[march]).rms_norm(x, None, norm.weight.data, norm.eps)
    assert stream is x
    with torch.no_grad():
        assert_close(got, norm(x), dtype, why)


@needs_cc
@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,partial", [(64, 1.0), (32, 0.5), (18, 1.0)])
def test_rotary_matches_model(libs, march, dtype, head_dim, partial):
    from transformers import LlamaConfig

    from batchlm.models.rope import RotaryEmbedding

    seed, g = seeded()
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, max_position_embeddings=512,
                      partial_rotary_factor=partial)
    rope = RotaryEmbedding(cfg, head_dim, dtype)
    T, heads = 7, 5
    x = torch.randn(T, heads + 3, head_dim, generator=g).to(dtype)[:, :heads]  # a strided view, as the model's
    positions = torch.randint(0, 512, (T,), generator=g)
    ref = rope.apply(x, *rope.lookup(positions))
    cos, sin = rope.tables(torch.device("cpu"))
    out = _into_poisoned(x.shape, dtype, lambda o: libs[march].rotary(x, positions, cos, sin, o))
    why = f"seed={seed} head_dim={head_dim} partial={partial} {march}"
    assert_close(out, ref, dtype, why)
    assert_close(NativeLayerKernels(libs[march]).rotary(x, positions, cos, sin), ref, dtype, why)


@needs_cc
@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,inter", [(1, 1536), (5, 37), (20, 64)])
def test_silu_mul_matches_model(libs, march, dtype, N, inter):
    seed, g = seeded()
    gate_up = (torch.randn(N, 2 * inter + 4, generator=g) * 3).to(dtype)[:, :2 * inter]  # strided rows
    gate, up = gate_up.split(inter, dim=-1)
    ref = F.silu(gate) * up
    out = _into_poisoned((N, inter), dtype, lambda o: libs[march].silu_mul(gate_up, o))
    why = f"seed={seed} N={N} inter={inter} {march}"
    assert_close(out, ref, dtype, why)
    assert_close(NativeLayerKernels(libs[march]).silu_and_mul(gate_up), ref, dtype, why)


def test_layer_kernels_refuse_other_dtypes():
    lib = cpu_native.library()
    if lib is None:
        pytest.skip(cpu_native.unavailable_reason())
    with pytest.raises(TypeError, match="float32 or bfloat16 CPU tensors"):
        NativeLayerKernels(lib).silu_and_mul(torch.zeros(2, 8, dtype=torch.float16))


def test_dispatch_picks_native_on_the_cpu():
    cpu = torch.device("cpu")
    if cpu_native.library() is None:
        assert isinstance(dispatch.get_attention_backend(cpu), TorchPagedAttention)
        pytest.skip(cpu_native.unavailable_reason())
    assert isinstance(dispatch.get_attention_backend(cpu), NativePagedAttention)
    assert isinstance(dispatch.get_attention_backend(cpu, "native"), NativePagedAttention)
    assert type(dispatch.get_attention_backend(cpu, "torch")) is TorchPagedAttention
    assert isinstance(dispatch.get_layer_kernels(cpu, "auto", torch.bfloat16), NativeLayerKernels)
    assert dispatch.get_layer_kernels(cpu, "auto", torch.float16) is None  # the models' own code
    assert dispatch.get_layer_kernels(cpu, "torch", torch.float32) is None
    with pytest.raises(ValueError, match="native' runs on the CPU in float32 or bfloat16, not torch.float16"):
        dispatch.get_layer_kernels(cpu, "native", torch.float16)


def test_native_off_means_the_references(native_off):
    cpu = torch.device("cpu")
    assert type(dispatch.get_attention_backend(cpu)) is TorchPagedAttention
    assert dispatch.get_layer_kernels(cpu, "auto", torch.float32) is None
    with pytest.raises(ValueError, match="BATCHLM_NATIVE_KERNELS=0"):
        dispatch.get_attention_backend(cpu, "native")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_rows_the_same_with_and_without_a_prefix_cache_hit(tmp_path, dtype):
    """The engine with the native kernels: a prompt run alone, then again in a batch after a
    prefix-cache hit on it (its last token recomputed alone: a prompt chunk of one, model_runner.
    _is_decode), gives the same tokens, and logprobs within float rounding: the linear layers'
    matmuls round differently at other row counts, with the PyTorch attention as well."""
    from transformers import LlamaConfig

    from batchlm import LLM, SamplingParams
    from tests.engine.helpers import tiny_model_dir

    d, _ = tiny_model_dir(tmp_path, LlamaConfig)
    llm = LLM(d, dtype=dtype, kv_cache_memory=1 << 22, max_model_len=256)
    if cpu_native.library() is not None:
        assert isinstance(llm.engine.model.model.layers[0].self_attn.attn, NativePagedAttention)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (33, 48, 17)]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    alone = llm.generate(prompts[:1], sp, use_tqdm=False)[0].outputs[0]
    hits = llm.engine.block_manager.hit_tokens
    batch = llm.generate(prompts, sp, use_tqdm=False)[0].outputs[0]  # prompt 0: a prefix-cache hit now
    assert llm.engine.block_manager.hit_tokens > hits
    assert batch.token_ids == alone.token_ids
    for a, b in zip(alone.logprobs, batch.logprobs):
        assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-3 for t in a), (a, b)
