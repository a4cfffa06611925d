"""The random draw: one uniform per row, then inverse CDF over the row.

`row_uniforms` gives u [B] in [0, 1): seeded rows (a generator on the row)
take one number from their own generator, unseeded sampling rows take theirs
batched from the shared generator, greedy rows take none. So a seeded row's
draws depend only on its own generator, whatever else is in the batch.

`inverse_cdf` picks, per row, the token whose slice of the cumulative mass
holds u * total. Tokens with e == 0 have an empty slice and are never picked.
It runs in place on e (e becomes its cumulative sum).

NOTE: the CDF is float32. A token's slice can be off by up to half an ulp of
the running sum, so tokens far below ~1e-7 of the row mass may be dropped;
over a flat 152k vocab that moves at most ~0.5% of the mass, far less for
peaked rows. (An exponential race over [B, V] noise is exact but ~5x slower
on CPU.)
"""
from __future__ import annotations

import torch
from torch import Tensor

from batchlm.sampling.types import SamplingRow


def row_uniforms(rows: list[SamplingRow], sample_rows: list[int], shared: torch.Generator,
                 device) -> Tensor:
    """u [B] float32: one draw per sampling row; 0 for the others."""
    u = torch.zeros(len(rows), dtype=torch.float32, device=device)
    unseeded = [i for i in sample_rows if rows[i].generator is None]
    if unseeded:
        u[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), generator=shared, device=device)
    for i in sample_rows:  # NOTE: the only per-row loop: per-request generators
        g = rows[i].generator
        if g is not None:
            u[i] = torch.rand(1, generator=g, device=device)[0]
    return u


def inverse_cdf(e: Tensor, u: Tensor) -> Tensor:
    """Token per row [B] long from unnormalised probs e [B, V] (>= 0, row sum > 0) and u [B]."""
    cdf = e.cumsum_(dim=-1)  # [B, V], in place; non-decreasing
    total = cdf[:, -1:].contiguous()  # [B, 1]
    idx = torch.searchsorted(cdf, u.unsqueeze(1) * total, right=True)  # [B, 1]
    # NOTE: u * total may round up to total; never go past the last token with mass.
    last = torch.searchsorted(cdf, total, right=False)  # [B, 1]
    return torch.minimum(idx, last).squeeze(1)
