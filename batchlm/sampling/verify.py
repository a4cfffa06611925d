"""Verifying proposed tokens when sampling: rejection sampling (Leviathan et
al. 2023; Chen et al. 2023) for a deterministic proposer.

The rule: accept the proposal d with probability min(1, p(d) / q(d)), else
draw from norm(max(0, p - q)), where p is the target model's distribution at
that position (after penalties, temperature, top-k, top-p and min-p, exactly
as the sampler shapes it without speculation) and q the proposer's. An
n-gram proposal is a function of the history, so q is one-hot on d and the
rule becomes: accept d with probability p(d); otherwise draw from p with d
removed and renormalised. The token is then distributed exactly as p:
P(d) = p(d), and for x != d, P(x) = (1 - p(d)) * p(x) / (1 - p(d)) = p(x).

`accept_drafts_(e, rows, drafts, u)` decides, per draft row, from the row's
first uniform u; it zeroes the proposal in e (in place) so that the usual
inverse-CDF draw, run with a second uniform (`draft_uniforms`), is the draw
from p without d. Greedy rows never come here: their token is the argmax and
the engine accepts the proposal when it equals it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from batchlm.sampling.types import SamplingRow


def draft_uniforms(rows: list[SamplingRow], draft_rows: list[int], shared: torch.Generator,
                   device) -> Tensor:
    """u2 [len(draft_rows)] float32: the second uniform of each draft row,
    from its own generator when seeded (drawn after the row's first), else
    batched from the shared one."""
    u = torch.empty(len(draft_rows), dtype=torch.float32, device=device)
    unseeded = [j for j, i in enumerate(draft_rows) if rows[i].generator is None]
    if unseeded:
        u[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), generator=shared, device=device)
    for j, i in enumerate(draft_rows):
        g = rows[i].generator
        if g is not None:
            u[j] = torch.rand(1, generator=g, device=device)[0]
    return u


def accept_drafts_(e: Tensor, rows: Tensor, drafts: Tensor, u: Tensor) -> Tensor:
    """accepted [n] bool: u < p(d) for each draft row, p = e[row] / e[row].sum().

    e [B, V] unnormalised probs (>= 0); rows [n] long rows of e; drafts [n]
    long the proposals; u [n] the rows' first uniforms. Zeroes e[rows, drafts]
    in place (the resampling distribution of a rejected row)."""
    sel = e.index_select(0, rows)  # [n, V]
    total = sel.sum(dim=-1)  # [n]
    p_draft = sel.gather(1, drafts.unsqueeze(1)).squeeze(1)  # [n], unnormalised
    accepted = u * total < p_draft  # [n]; p(d) = 1 is always accepted (u < 1)
    e[rows, drafts] = 0.0
    return accepted
