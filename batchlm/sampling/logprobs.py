"""Log-probabilities from raw model logits: per generated token, per prompt
token, and of given target tokens (classification scoring).

All values are log_softmax of the logits as given (no penalties, temperature
or filtering), computed in float32 as `logit - logsumexp(row)`. Work is done in
chunks of rows so a long prompt over a large vocabulary never needs a second
[N, V] tensor.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

# NOTE: bounds the temporaries of one chunk to about this many elements.
_CHUNK_ELEMENTS = 1 << 24


def _chunks(n: int, vocab: int) -> Iterator[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _check(logits: Tensor, target_ids: list[int]) -> None:
    if logits.dim() != 2 or logits.shape[0] != len(target_ids):
        raise ValueError(f"logits must be [N, V] with N == len(target_ids) ({len(target_ids)}), "
                         f"got {tuple(logits.shape)}")


def topk_logprobs(logits: Tensor, target_ids: list[int], ks: list[int]) -> list[dict[int, float]]:
    """Per row i: {target_ids[i]: lp} plus row i's top-ks[i] tokens. logits [N, V]."""
    _check(logits, target_ids)
    if len(ks) != len(target_ids):
        raise ValueError(f"ks must have one entry per row, got {len(ks)} for {len(target_ids)} rows")
    out: list[dict[int, float]] = []
    vocab = logits.shape[1]
    for s in _chunks(len(target_ids), vocab):
        x = logits[s].float()  # [n, V]
        lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [n, 1]
        tgt = torch.tensor(target_ids[s], dtype=torch.long, device=x.device).unsqueeze(1)  # [n, 1]
        tgt_lp = (x.gather(1, tgt) - lse).squeeze(1).tolist()  # [n]
        chunk_ks = ks[s]
        max_k = min(max(chunk_ks), vocab)
        if max_k > 0:
            top_v, top_i = x.topk(max_k, dim=-1)  # [n, K]
            top_v, top_i = (top_v - lse).tolist(), top_i.tolist()
        for j, t in enumerate(target_ids[s]):
            k = chunk_ks[j]
            d = dict(zip(top_i[j][:k], top_v[j][:k])) if k > 0 else {}
            d[t] = tgt_lp[j]
            out.append(d)
    return out


def prompt_logprobs(logits: Tensor, target_ids: list[int], k: int) -> list[dict[int, float]]:
    """logits [N, V] at prompt positions 0..N-1; target_ids[i] is prompt token i+1.

    Returns one dict per position: {target: lp} plus the top-k tokens. The
    caller prepends None for the first prompt token (nothing predicts it), as
    vLLM does.
    """
    return topk_logprobs(logits, target_ids, [k] * len(target_ids))


def token_logprobs(logits: Tensor, target_ids: list[int]) -> list[float]:
    """log_softmax(logits[i])[target_ids[i]] for each row. logits [N, V]."""
    _check(logits, target_ids)
    out: list[float] = []
    for s in _chunks(len(target_ids), logits.shape[1]):
        x = logits[s].float()  # [n, V]
        tgt = torch.tensor(target_ids[s], dtype=torch.long, device=x.device).unsqueeze(1)  # [n, 1]
        out.extend((x.gather(1, tgt) - torch.logsumexp(x, dim=-1, keepdim=True)).squeeze(1).tolist())
    return out
