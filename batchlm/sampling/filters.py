"""Shape the sampling distribution: temperature, then top-k, top-p and min-p.

`apply_temperature` divides logits [b, V] in place. The filters then work on
unnormalised probabilities `e = exp(logits - rowmax)` [b, V] (row max is 1)
and zero the tokens they remove, in place, with one masked pass:
each row gets a threshold tau and keeps the tokens with e >= tau.

- top-k keeps the k largest (k <= 0 or k >= V: off).
- top-p, after top-k and on the renormalised top-k distribution, keeps the
  smallest set of top tokens whose cumulative probability is >= top_p; the
  top token is always kept.
- min-p drops tokens with prob < min_p * max prob, i.e. e < min_p. Prob
  ratios don't change when a set holding the top token is renormalised, so
  min-p before or after top-k/top-p keeps the same tokens.
Tokens tied with the last kept one are kept too.

The top-k/top-p cut is found without a full sort where it can be: the top K
candidates are taken with topk and rows whose cut lies beyond K fall back to
a full sort. Sums are prefix sums over the sorted values, so a
row's threshold doesn't depend on K or on the other rows in the batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# NOTE: smallest first candidate set for top-p; if a row's cut lies beyond it
# (a very flat distribution), that row falls back to a full sort.
_MIN_CANDIDATES = 1024


def apply_temperature(logits: Tensor, temperature: list[float]) -> None:
    """logits [b, V] /= temperature [b], in place. Temperatures must be > 0."""
    if all(t == 1.0 for t in temperature):
        return
    t = torch.tensor(temperature, dtype=logits.dtype, device=logits.device)
    logits.div_(t.unsqueeze(1))


def filter_probs_(e: Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> None:
    """Zero, in place, the tokens top-k / top-p / min-p remove. e [b, V] >= 0 with row max 1."""
    b, vocab = e.shape
    tau = torch.tensor(min_p, dtype=e.dtype, device=e.device)  # [b]; min-p: e < min_p
    rows = [i for i in range(b) if 0 < top_k[i] < vocab or top_p[i] < 1.0]
    if rows:
        cut = _top_k_top_p_threshold(e, rows, [top_k[i] for i in rows], [top_p[i] for i in rows])
        r = torch.tensor(rows, device=e.device)
        tau[r] = torch.maximum(tau[r], cut)
    if rows or any(p > 0.0 for p in min_p):
        e.masked_fill_(e < tau.unsqueeze(1), 0.0)


def _top_k_top_p_threshold(e: Tensor, rows: list[int], top_k: list[int], top_p: list[float]) -> Tensor:
    """Per listed row, the e value of the last token top-k/top-p keeps. Returns [len(rows)]."""
    b, vocab = e.shape
    device = e.device
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    need_total = any(k == vocab and p < 1.0 for k, p in zip(ks, top_p))
    total = e.sum(dim=-1) if need_total else None  # [b] full mass, for top-p without top-k
    out = torch.empty(len(rows), dtype=e.dtype, device=device)
    pending = list(range(len(rows)))
    size = min(vocab, max([_MIN_CANDIDATES] + [k for k in ks if k < vocab]))
    while pending:
        sub = [rows[j] for j in pending]
        src = e if len(sub) == b else e[torch.tensor(sub, device=device)]
        if size < vocab:
            vals = src.topk(size, dim=-1, sorted=True).values  # [n, K] descending
        else:
            vals = src.sort(dim=-1, descending=True).values  # [n, V]
        k_t = torch.tensor([ks[j] for j in pending], device=device)  # [n]
        p_t = torch.tensor([top_p[j] if top_p[j] < 1.0 else float("inf") for j in pending],
                           dtype=e.dtype, device=device)  # [n]
        cum = vals.cumsum(dim=-1)  # [n, K]
        before = F.pad(cum[:, :-1], (1, 0))  # [n, K] mass strictly above each token
        # NOTE: the first size covers every k < V, so a row with k > size has
        # k == V (top-p alone) and its mass is the row total.
        in_k = k_t <= size  # [n] top-k set inside the candidates
        mass = cum.gather(1, (k_t.clamp(max=size) - 1).unsqueeze(1)).squeeze(1)  # [n]
        if total is not None:
            mass = torch.where(in_k, mass, total[torch.tensor(sub, device=device)])
        pos = torch.arange(size, device=device)
        keep = (pos.unsqueeze(0) < k_t.unsqueeze(1)) & (before < (p_t * mass).unsqueeze(1))  # [n, K], a prefix
        n_keep = keep.sum(dim=-1)  # [n] >= 1: before[:, 0] == 0
        resolved = in_k | (n_keep < size)
        thresh = vals.gather(1, (n_keep - 1).unsqueeze(1)).squeeze(1)  # [n]
        pend = torch.tensor(pending, device=device)
        out[pend[resolved]] = thresh[resolved]
        pending = pend[~resolved].tolist()
        size = vocab
    return out
