"""Greedy generations are token-identical to transformers `generate`, for
every architecture (sliding windows included), with prefix caching on and off,
chunked prefill forced, preemption forced and the layers torch.compile'd; and the
same with n-gram speculative decoding (modes spec-*) and a draft model (draft-*:
the model itself, or another random one): the outputs must not change."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from batchlm import LLM, SamplingParams

from .helpers import hf_greedy, tiny_model_dir

ARCHS = {
    "llama": (LlamaConfig, {}),
    "llama3-rope-untied": (LlamaConfig, dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": (MistralConfig, {}),
    # Windows far shorter than the prompts: every layer (Mistral), the second
    # layer only (Qwen2 layer_types from max_window_layers).
    "mistral-window8": (MistralConfig, dict(sliding_window=8)),
    "qwen2-window5": (Qwen2Config, dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, dict(head_dim=32)),
}

MAX_NEW = 24


def _prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()
    out = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 50, 9)]
    # two prompts sharing a 40-token prefix: exercises prefix-cache hits
    out += [shared + [1, 2, 3], shared + [4, 5, 6, 7, 8]]
    return out


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    cls, overrides = ARCHS[request.param]
    d, model = tiny_model_dir(tmp_path_factory.mktemp(request.param), cls, **overrides)
    other, _ = tiny_model_dir(tmp_path_factory.mktemp(request.param + "-draft"), cls, seed=1, **overrides)
    prompts = _prompts()
    return d, prompts, hf_greedy(model, prompts, MAX_NEW), other


SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.mark.parametrize("mode", ["default", "no-prefix-cache", "chunked", "preempt", "compiled", "spec",
                                  "spec-no-prefix-cache", "spec-chunked", "spec-preempt", "draft-self",
                                  "draft-self-no-prefix-cache", "draft-self-chunked", "draft-self-preempt",
                                  "draft-other"])
def test_greedy_matches_transformers(arch, mode):
    d, prompts, ref, other = arch
    kwargs = dict(kv_cache_memory=1 << 24, dtype="float32")  # exact: fp32, as transformers
    speculate = mode.startswith(("spec", "draft"))
    accept_some = True
    if mode.startswith("spec"):
        kwargs["speculative_config"] = SPEC
        mode = mode.removeprefix("spec").removeprefix("-") or "default"
    elif mode.startswith("draft"):
        # the model as its own draft (proposals mostly accepted), or another random one (mostly rejected)
        draft = d if mode.startswith("draft-self") else other
        kwargs["speculative_config"] = {"method": "draft", "model": draft, "num_speculative_tokens": 3}
        accept_some = draft == d
        mode = mode.removeprefix("draft-self").removeprefix("draft-other").removeprefix("-") or "default"
    if mode == "no-prefix-cache":
        kwargs["enable_prefix_caching"] = False
    elif mode == "chunked":
        kwargs["max_num_batched_tokens"] = 7  # every prompt but one is split
    elif mode == "compiled":
        kwargs["compile_model"] = True
    elif mode == "preempt":
        llm_probe = LLM(model=d, dtype="float32", kv_cache_memory=1 << 20,
                        speculative_config=kwargs.get("speculative_config"))  # a draft's cache too
        per_block = (1 << 20) // llm_probe.engine.block_manager.num_blocks
        # 9 blocks of 16 for 6 sequences of up to 74 tokens (8 with speculation: it finishes
        # sequences in fewer steps, so fewer grow at once)
        kwargs["kv_cache_memory"] = per_block * (8 if speculate else 9)
    llm = LLM(model=d, **kwargs)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in outs]
    diff = [i for i, (a, b) in enumerate(zip(got, ref)) if a != b]
    assert not diff, f"prompts {diff} differ from transformers: {[(got[i], ref[i]) for i in diff]}"
    if mode == "preempt":
        assert llm.engine.scheduler.num_preemptions > 0
    if speculate:  # proposals were made (and some accepted): speculation really ran
        stats = llm.engine.spec_stats
        assert stats.proposed > 0 and (stats.accepted > 0 or not accept_some), stats.as_dict()
    if mode == "default":
        # Again: now every prompt's full blocks come from the prefix cache.
        again = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in again] == ref
        assert llm.engine.block_manager.hit_tokens >= sum(len(p) // 16 * 16 for p in prompts)
    if mode == "chunked":
        assert llm.engine.max_num_batched_tokens == 7
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
