"""Shape the sampling distribution: temperature, top-k, top-p, min-p.

Each function takes logits [b, V] float32 for rows that will be sampled (no
greedy rows: temperature must be >= 1e-5) and per-row settings as lists of
length b, and marks removed tokens with -inf.

- top-k keeps the k largest logits (k <= 0 or k >= V: off).
- top-p, applied after top-k on the renormalised distribution, keeps the
  smallest set of top tokens whose cumulative probability is >= top_p; the
  top token is always kept.
- min-p drops tokens with prob < min_p * max prob. Prob ratios don't change
  when a set holding the top token is renormalised, so this is the same
  whether it runs before or after top-k/top-p.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# NOTE: above this k, a full sort is used instead of topk for the candidate set.
_MAX_TOPK_CANDIDATES = 4096


def apply_temperature(logits: Tensor, temperature: list[float]) -> None:
    """logits [b, V] /= temperature [b], in place."""
    t = torch.tensor(temperature, dtype=logits.dtype, device=logits.device)
    logits.div_(t.unsqueeze(1))


def apply_top_k_top_p(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """Return logits [b, V] with tokens outside each row's top-k / top-p set at -inf."""
    b, vocab = logits.shape
    device = logits.device
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    max_k = max(ks)
    if max_k <= _MAX_TOPK_CANDIDATES:
        vals, order = logits.topk(max_k, dim=-1, sorted=True)  # [b, K], descending
    else:
        vals, order = logits.sort(dim=-1, descending=True)  # [b, V]
    pos = torch.arange(vals.shape[1], device=device)  # [K]
    k_t = torch.tensor(ks, device=device)  # [b]
    vals = vals.masked_fill(pos.unsqueeze(0) >= k_t.unsqueeze(1), float("-inf"))
    if any(p < 1.0 for p in top_p):
        p_t = torch.tensor([p if p < 1.0 else math.inf for p in top_p], dtype=vals.dtype, device=device)
        probs = vals.softmax(dim=-1)  # [b, K], renormalised over the top-k
        before = probs.cumsum(dim=-1) - probs  # [b, K] mass strictly above this token
        # NOTE: before[:, 0] == 0 < top_p, so the top token is always kept.
        vals = vals.masked_fill(before >= p_t.unsqueeze(1), float("-inf"))
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(1, order, vals)


def apply_min_p(logits: Tensor, min_p: list[float]) -> None:
    """Drop tokens with prob < min_p * max prob, in place: logit < max + log(min_p)."""
    log_min_p = torch.tensor([math.log(p) if p > 0 else -math.inf for p in min_p],
                             dtype=logits.dtype, device=logits.device)  # [b]
    threshold = logits.amax(dim=-1) + log_min_p  # [b]
    logits.masked_fill_(logits < threshold.unsqueeze(1), float("-inf"))
