"""Logit adjustments that depend on token history: min_tokens, repetition,
frequency and presence penalties.

All functions edit `logits` [B, V] (float32, contiguous) in place, only on the
given rows, and never build a [B, V] side tensor: each row's history becomes a
flat list of (row, token) keys, `row * V + token`, and the logits at those keys
are gathered, adjusted and written back.

Order (as the sampler calls them): `suppress_min_tokens`, then
`apply_penalties` (repetition first, then frequency/presence).
- repetition (HF / vLLM): over prompt + output tokens, a logit > 0 is divided
  by the penalty, a logit <= 0 multiplied by it.
- frequency / presence (OpenAI): over output tokens only,
  logit -= frequency * count + presence * (count > 0).
Token ids >= V are ignored.
"""
from __future__ import annotations

from itertools import chain

import numpy as np
import torch
from torch import Tensor

from batchlm.sampling.plan import suppressed_ids
from batchlm.sampling.types import SamplingRow


def _keys(token_lists: list[list[int]], row_ids: list[int], vocab: int, device) -> Tensor:
    """Flat keys row * vocab + token for every (row, token) pair, ids >= vocab dropped. [T] long"""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    total = int(lengths.sum())
    flat = np.fromiter(chain.from_iterable(token_lists), dtype=np.int64, count=total)  # [T]
    rows = np.repeat(np.asarray(row_ids, dtype=np.int64), lengths)  # [T]
    if total and (flat.min() < 0 or flat.max() >= vocab):
        ok = (flat >= 0) & (flat < vocab)
        flat, rows = flat[ok], rows[ok]
    return torch.from_numpy(rows * vocab + flat).to(device)


def suppress_min_tokens(logits: Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """Set eos and stop_token_ids to -inf for rows that haven't reached min_tokens."""
    if not idx:
        return
    vocab = logits.shape[1]
    keys = _keys([suppressed_ids(rows[i]) for i in idx], idx, vocab, logits.device)
    logits.view(-1)[keys] = float("-inf")


def apply_penalties(logits: Tensor, rows: list[SamplingRow], idx: list[int]) -> None:
    """Repetition, then frequency and presence penalties, on rows `idx` in place."""
    if not idx:
        return
    vocab, device = logits.shape[1], logits.device
    flat_logits = logits.view(-1)  # [B * V]; NOTE: needs a contiguous tensor

    rep_idx = [i for i in idx if rows[i].params.repetition_penalty != 1.0]
    if rep_idx:
        hist = [rows[i].prompt_token_ids + rows[i].output_token_ids for i in rep_idx]
        keys = torch.unique(_keys(hist, rep_idx, vocab, device))  # [U]
        by_row = torch.zeros(logits.shape[0], dtype=logits.dtype, device=device)
        by_row[rep_idx] = torch.tensor([rows[i].params.repetition_penalty for i in rep_idx],
                                       dtype=logits.dtype, device=device)
        penalty = by_row[keys // vocab]  # [U]
        vals = flat_logits[keys]  # [U]
        flat_logits[keys] = torch.where(vals > 0, vals / penalty, vals * penalty)

    fp_idx = [i for i in idx
              if rows[i].params.frequency_penalty != 0.0 or rows[i].params.presence_penalty != 0.0]
    if fp_idx:
        keys = _keys([rows[i].output_token_ids for i in fp_idx], fp_idx, vocab, device)
        keys, counts = torch.unique(keys, return_counts=True)  # [U], [U]
        freq = torch.zeros(logits.shape[0], dtype=logits.dtype, device=device)
        pres = torch.zeros_like(freq)
        freq[fp_idx] = torch.tensor([rows[i].params.frequency_penalty for i in fp_idx],
                                    dtype=logits.dtype, device=device)
        pres[fp_idx] = torch.tensor([rows[i].params.presence_penalty for i in fp_idx],
                                    dtype=logits.dtype, device=device)
        r = keys // vocab
        flat_logits[keys] -= freq[r] * counts.to(logits.dtype) + pres[r]
