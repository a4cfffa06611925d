"""The sampler's seam with the engine: what one row brings in, what a step returns.

A `SamplingRow` is one position of a sequence that needs a token this step
(a speculating sequence brings one row per position it verifies). The sampler
reads it and never mutates it; the engine owns the lists and the generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from batchlm.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated so far (penalties, min_tokens)
    # Per-request generator, seeded from params.seed (see `request_generator`);
    # None: the sampler's shared generator. Must live on the logits' device.
    generator: torch.Generator | None = None
    # Suppressed (with params.stop_token_ids) while len(output) < min_tokens,
    # unless params.ignore_eos.
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    # Speculative decoding: a proposed token for this position, to verify.
    # The row's token is then the proposal when accepted (greedy: it is the
    # argmax; sampling: with probability p(proposal)), else a token drawn from
    # p with the proposal removed (see sampling/verify.py). None: a plain draw.
    draft_token_id: int | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row
    # Per row: None if params.logprobs is None, else {sampled token: lp} plus
    # the top-k tokens, from the model's RAW log-softmax (before penalties,
    # temperature and filtering), like vLLM's default.
    logprobs: list[dict[int, float] | None]


def request_generator(params: SamplingParams, device, index: int = 0) -> torch.Generator | None:
    """A generator for one sequence of a request: None if unseeded.

    NOTE: for n > 1, pass each child's index so siblings draw different
    numbers (seed + index, as vLLM does for parallel sampling).
    """
    if params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed + index)
    return g
