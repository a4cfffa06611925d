"""End to end on the CPU: a tiny random model with attention_backend="triton"
(the kernels in Triton's interpreter) generates greedily the same tokens as
with the PyTorch reference, through chunked prefill and prefix-cache hits,
with grouped-query attention and a sliding-window layer."""
from __future__ import annotations

import random

import pytest
from transformers import Qwen2Config

from batchlm import LLM, SamplingParams
from batchlm.kernels.triton_attention import TritonPagedAttention
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
    assert got == ref, f"prompts={ps}"
    hits = llm.engine.block_manager.hit_tokens
    again = llm.generate(ps, SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == ref
    assert llm.engine.block_manager.hit_tokens - hits >= 16 * 4  # the second run read cached blocks
