"""`bench throughput --baseline llamacpp`: llama.cpp on the same GGUF file and prompts.

llama-cpp-python is not a dependency: without it the option fails with a
message saying what to install; with it, llama.cpp's greedy tokens on the
default model's Q4_1 file are compared with batchlm running the same blocks
as int4 (the GGUF's Q4_1 blocks load bit-exact, batchlm.models.gguf_weights).
"""
from __future__ import annotations

import pytest

from batchlm import cli
from batchlm.bench.llamacpp_baseline import available


@pytest.mark.skipif(available(), reason="llama-cpp-python is installed")
def test_without_llama_cpp_the_option_says_what_to_install():
    with pytest.raises(SystemExit, match="pip install llama-cpp-python"):
        cli.main(["bench", "throughput", "--baseline", "llamacpp", "--skip-batchlm", "--num-prompts", "1",
                  "--input-len", "8", "--output-len", "2"])


@pytest.mark.slow
@pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed")
def test_llama_cpp_greedy_agrees_with_batchlm_int4_on_the_same_blocks():
    from batchlm import LLM, SamplingParams
    from batchlm.bench.llamacpp_baseline import run_llamacpp
    from batchlm.models.resolve import gguf_source

    llm = LLM(quantization="int4", max_model_len=512)
    tok = llm.get_tokenizer()
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"]
               for q in ("What is the capital of France?", "Name three primary colors.",
                         "Write one sentence about the sea.", "What is 2 + 2?")]
    run = run_llamacpp(str(gguf_source("smollm2-135m-instruct")), prompts, 8, True, 2)
    assert [len(t) for t in run.token_ids] == [8] * 4  # ignore_eos: exactly max_tokens each
    assert run.prompt_s > 0 and run.decode_s > 0 and run.num_prompt_tokens == sum(map(len, prompts))
    ours = llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    # Same weights; activations differ (llama.cpp rounds them to 8 bits for its dot
    # products), so whole sequences may part after a near-tie, but the first token
    # of every prompt agrees.
    assert [t[0] for t in run.token_ids] == [o.outputs[0].token_ids[0] for o in ours]
