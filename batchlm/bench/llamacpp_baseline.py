"""The llama.cpp baseline: the same GGUF file and prompts through llama-cpp-python.

Contract: `run_llamacpp(gguf_path, prompts, max_tokens, ignore_eos, threads)`
loads the GGUF with llama.cpp (`llama_cpp.Llama`, `threads` threads, a
context as long as the longest prompt + max_tokens), then, for each prompt
(token-id lists, in input order, one at a time: batch 1, as llama.cpp's
high-level API runs), evaluates the prompt and decodes greedily (top_k=1)
up to `max_tokens` new tokens, stopping after the first eos unless
`ignore_eos`. Returns a `LlamaCppRun` with each request's token ids and the
wall time of the prompt evaluation + decoding (model load and a 2-token
warm-up excluded), split into prompt and decode seconds.

llama-cpp-python is not a dependency (it builds llama.cpp from source:
`pip install llama-cpp-python`, about 10 minutes on 2 cores); `available()`
says whether it is installed. What this module does not know: batchlm.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass

from batchlm.bench.report import OutputRates


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass(frozen=True)
class LlamaCppRun(OutputRates):
    wall_s: float
    prompt_s: float  # evaluating the prompts
    decode_s: float  # generating every new token after the first
    token_ids: list[list[int]]  # per prompt, eos included when hit
    num_prompt_tokens: int
    version: str

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after each request's first, per second of decoding: the batch-1 decode rate."""
        n = sum(max(0, len(t) - 1) for t in self.token_ids)
        return n / self.decode_s if self.decode_s > 0 else float("nan")


def load_llamacpp(gguf_path: str, n_ctx: int, threads: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads,
                           n_threads_batch=threads, n_batch=min(512, n_ctx), logits_all=False, verbose=False)


def _generate(llm, prompt: list[int], max_tokens: int, stop: set[int]) -> tuple[list[int], float, float]:
    """(new token ids, prompt seconds, decode seconds) for one prompt, greedy."""
    llm.reset()
    out: list[int] = []
    t0 = time.perf_counter()
    t_first = t0
    # generate() evaluates the prompt, then each sampled token, one at a time
    for tok in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                            reset=True):
        if not out:
            t_first = time.perf_counter()
        out.append(tok)
        if tok in stop or len(out) >= max_tokens:
            break
    t1 = time.perf_counter()
    return out, t_first - t0, t1 - t_first


def run_llamacpp(gguf_path: str, prompts: list[list[int]], max_tokens: int, ignore_eos: bool,
                 threads: int) -> LlamaCppRun:
    import llama_cpp

    llm = load_llamacpp(gguf_path, max(len(p) for p in prompts) + max_tokens + 8, threads)
    stop = set() if ignore_eos else {llm.token_eos()}
    _generate(llm, prompts[0][:16], 2, set())  # warm-up
    outputs, prompt_s, decode_s = [], 0.0, 0.0
    for p in prompts:
        ids, tp, td = _generate(llm, p, max_tokens, stop)
        outputs.append(ids)
        prompt_s += tp
        decode_s += td
    return LlamaCppRun(prompt_s + decode_s, prompt_s, decode_s, outputs, sum(len(p) for p in prompts),
                       getattr(llama_cpp, "__version__", "?"))
