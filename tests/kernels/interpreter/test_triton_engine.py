"""End to end on the CPU: a tiny random model with attention_backend="triton"
(the attention and the layer kernels in Triton's interpreter: fused residual
add + RMSNorm, rotary, SiLU-and-multiply) generates greedily the same tokens
as with the PyTorch reference, through chunked prefill and prefix-cache hits,
with grouped-query attention and a sliding-window layer; and a Qwen3 (per-head
q/k norms through the norm kernel) with partial rotary (Llama) likewise."""
from __future__ import annotations

import random

import pytest
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from batchlm import LLM, SamplingParams
from batchlm.kernels.triton_attention import TritonPagedAttention
from batchlm.kernels.triton_layers import TritonLayerKernels
from tests.engine.helpers import tiny_model_dir

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # GQA 2 (4 heads, 2 kv heads, head dim 16); layer 1 has a window of 5 tokens.
    d, _ = tiny_model_dir(tmp_path_factory.mktemp("qwen2"), Qwen2Config, seed=random.randrange(1 << 16),
                          use_sliding_window=True, sliding_window=5, max_window_layers=1)
    return d


def prompts():
    rnd = random.Random(random.SystemRandom().randrange(1 << 30))
    shared = [rnd.randrange(256) for _ in range(35)]
    # two prompts share two full blocks of 16: the second run hits the prefix cache
    return [[rnd.randrange(256) for _ in range(n)] for n in (3, 20)] + [shared + [1, 2], shared + [7]]


def generate(d, backend, ps, **kwargs):
    llm = LLM(model=d, dtype="float32", kv_cache_memory=1 << 22, attention_backend=backend, **kwargs)
    outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("chunked", [False, True])
def test_triton_backend_greedy_matches_torch(model_dir, chunked):
    ps = prompts()
    kwargs = dict(max_num_batched_tokens=7) if chunked else {}  # every prompt but one split into chunks
    _, ref = generate(model_dir, "torch", ps, **kwargs)
    llm, got = generate(model_dir, "triton", ps, **kwargs)
    assert isinstance(llm.engine.model.model.layers[0].self_attn.attn, TritonPagedAttention)
    assert isinstance(llm.engine.model.model.kernels, TritonLayerKernels)
    assert got == ref, f"prompts={ps}"
    hits = llm.engine.block_manager.hit_tokens
    again = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == ref
    assert llm.engine.block_manager.hit_tokens - hits >= 16 * 4  # the second run read cached blocks


OTHER_MODELS = {
    "qwen3_qk_norm": (Qwen3Config, dict(head_dim=16)),
    "llama_partial_rotary": (LlamaConfig, dict(partial_rotary_factor=0.5)),
}


@pytest.mark.parametrize("name", list(OTHER_MODELS))
def test_layer_kernels_other_models_greedy_match_torch(tmp_path, name):
    cls, overrides = OTHER_MODELS[name]
    d, _ = tiny_model_dir(tmp_path, cls, seed=random.randrange(1 << 16), **overrides)
    ps = prompts()[:3]
    _, ref = generate(d, "torch", ps)
    llm, got = generate(d, "triton", ps)
    assert isinstance(llm.engine.model.model.kernels, TritonLayerKernels)
    assert got == ref, f"{name} prompts={ps}"


def test_cuda_graph_static_forward_greedy_matches_torch(model_dir):
    # What a CUDA graph would hold (static input buffer, padding rows writing
    # into the dummy block, split count from graph_max_blocks), run eagerly at
    # each decode step: no GPU here to capture it. Three sequences stopping
    # after 8, 5 and 3 tokens: decode batches 3, 2 and 1 (buckets 4, 2, 1).
    ps = prompts()[:3]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (8, 5, 3)]
    ref_llm = LLM(model=model_dir, dtype="float32", kv_cache_memory=1 << 22, attention_backend="torch")
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(ps, params, use_tqdm=False)]
    llm = LLM(model=model_dir, dtype="float32", kv_cache_memory=1 << 22, attention_backend="triton",
              max_num_seqs=4)
    eng = llm.engine
    assert not eng.cuda_graphs  # the CPU never captures
    eng.runner.enable_cuda_graphs(4, eng.max_model_len, eng.hf_config.hidden_size, eng.dtype, capture=False)
    got = [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]
    assert got == ref, f"prompts={ps}"
    assert [len(t) for t in got] == [8, 5, 3]
    replays = eng.runner.graphs.replays
    assert replays[4] >= 1 and replays[2] >= 1 and replays[1] >= 1, replays
