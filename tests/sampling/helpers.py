"""Tiny factories for sampler tests."""
from __future__ import annotations

import torch

from batchlm.sampling.types import SamplingRow, request_generator
from batchlm.sampling_params import SamplingParams


def row(prompt=(), output=(), eos=(), **params) -> SamplingRow:
    p = SamplingParams(**params)
    return SamplingRow(p, list(prompt), list(output), request_generator(p, "cpu"), frozenset(eos))


def probs_of(logits_1d: torch.Tensor) -> list[float]:
    return logits_1d.softmax(-1).tolist()
