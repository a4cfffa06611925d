"""The engine on a CUDA device: greedy generation in fp32 on tiny random
models gives the same tokens as the CPU path (the PyTorch references), with
the reference attention on the GPU, with the Triton kernels (attention and
layer kernels) eagerly, and with CUDA graphs for the decode steps; chunked
prefill and prefix-cache hits included. Skipped without CUDA.

Passed on an H100 (torch 2.11, triton 3.6), 2026-11-26 (see README, GPUs).
"""
from __future__ import annotations

import random

import pytest
import torch
from transformers import Qwen2Config, Qwen3Config

from batchlm import LLM, SamplingParams
from tests.engine.helpers import tiny_model_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MAX_NEW = 12
MODELS = {
    # GQA 2, head dim 16, layer 1 with a sliding window of 5 tokens
    "qwen2_window": (Qwen2Config, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # per-head q/k norms, head dim 32
    "qwen3": (Qwen3Config, dict(head_dim=32)),
}


def prompts(seed):
    rnd = random.Random(seed)
    shared = [rnd.randrange(256) for _ in range(35)]
    return ([[rnd.randrange(256) for _ in range(n)] for n in (1, 3, 20, 70)]
            + [shared + [1, 2], shared + [7], shared])


def greedy(llm, ps):
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(ps, params, use_tqdm=False)]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    cls, overrides = MODELS[request.param]
    seed = random.SystemRandom().randrange(1 << 16)
    d, _ = tiny_model_dir(tmp_path_factory.mktemp(request.param), cls, seed=seed, **overrides)
    return request.param, d, seed


@pytest.mark.parametrize("chunked", [False, True])
def test_gpu_greedy_matches_cpu(model, chunked):
    name, d, seed = model
    ps = prompts(seed)
    kw = dict(dtype="float32", kv_cache_memory=1 << 24, **(dict(max_num_batched_tokens=7) if chunked else {}))
    ref = greedy(LLM(model=d, device="cpu", attention_backend="torch", **kw), ps)
    why = f"model={name} seed={seed} chunked={chunked}"
    runs = {
        "cuda torch": dict(attention_backend="torch"),
        "cuda triton eager": dict(attention_backend="triton", enforce_eager=True),
        "cuda triton graphs": dict(attention_backend="triton"),
    }
    for label, extra in runs.items():
        llm = LLM(model=d, device="cuda", **kw, **extra)
        assert llm.engine.cuda_graphs == (label == "cuda triton graphs"), label
        assert greedy(llm, ps) == ref, f"{label}: {why}"
        hits = llm.engine.block_manager.hit_tokens
        assert greedy(llm, ps) == ref, f"{label}, again (prefix-cache hits): {why}"
        assert llm.engine.block_manager.hit_tokens > hits
        if llm.engine.cuda_graphs:
            replays = llm.engine.runner.graphs.replays
            assert sum(replays.values()) >= MAX_NEW, replays  # the decode steps went through the graphs


def test_cuda_graphs_on_and_off_identical_at_many_batch_sizes(model):
    # 40 prompts with staggered lengths of output: decode batches shrink from
    # 40 through every bucket (64, 32, 16, 8, 4, 2, 1: padding in most).
    name, d, seed = model
    rnd = random.Random(seed)
    ps = [[rnd.randrange(256) for _ in range(rnd.randrange(1, 60))] for _ in range(40)]
    params = [SamplingParams(temperature=0, max_tokens=1 + i, ignore_eos=True) for i in range(40)]
    kw = dict(dtype="float32", kv_cache_memory=1 << 26, device="cuda", attention_backend="triton", max_num_seqs=64)
    off = LLM(model=d, enforce_eager=True, **kw).generate(ps, params, use_tqdm=False)
    llm = LLM(model=d, **kw)
    on = llm.generate(ps, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in on] == [o.outputs[0].token_ids for o in off], f"{name} seed={seed}"
    replays = llm.engine.runner.graphs.replays
    assert all(replays[b] > 0 for b in (1, 2, 4, 8, 16, 32, 64)), replays
