"""Sampling: turn one step's logits into next tokens (and logprobs).

Modules:
- types.py      SamplingRow (a row's inputs), SamplerOutput, request_generator
- plan.py       StepPlan: which rows need which work this step
- penalties.py  min_tokens suppression; repetition / frequency / presence penalties
- filters.py    temperature, top-k, top-p, min-p (thresholds on unnormalised probs)
- draw.py       one uniform per row (own generator if seeded) + inverse CDF
- logprobs.py   raw logprobs: per generated token, prompt_logprobs, token_logprobs
- sampler.py    Sampler: the per-step pipeline, greedy fast path, workspace reuse
"""
from batchlm.sampling.logprobs import prompt_logprobs, token_logprobs, topk_logprobs
from batchlm.sampling.sampler import Sampler
from batchlm.sampling.types import SamplerOutput, SamplingRow, request_generator

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingRow",
    "prompt_logprobs",
    "request_generator",
    "token_logprobs",
    "topk_logprobs",
]
