"""Rejection sampling of a proposed token (sampling/verify.py) through the
Sampler: the token keeps the target distribution p (after temperature and
filters) whatever is proposed; greedy rows just take the argmax; seeded rows
draw only from their own generator."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from batchlm.sampling.sampler import Sampler
from batchlm.sampling.types import SamplingRow, request_generator
from batchlm.sampling_params import SamplingParams

from .helpers import row

N = 20000
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def _rows(draft, **params):
    p = SamplingParams(**params)
    return [SamplingRow(p, [], [], None, frozenset(), draft) for _ in range(N)]


def _target(**params) -> torch.Tensor:
    """p after temperature and top-p, computed directly."""
    probs = (LOGITS / params.get("temperature", 1.0)).softmax(-1)
    top_p = params.get("top_p", 1.0)
    if top_p < 1.0:
        order = probs.argsort(descending=True)
        before = probs[order].cumsum(0) - probs[order]
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[before < top_p]] = True
        probs = torch.where(keep, probs, 0.0)
        probs /= probs.sum()
    return probs


class _AlwaysAccept(Sampler):
    def _accept_drafts(self, e, rows, drafts, u):
        super()._accept_drafts(e, rows, drafts, u)
        return torch.ones(len(rows), dtype=torch.bool)


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_p=0.8)])
@pytest.mark.parametrize("draft", [0, 3, 7])
@pytest.mark.parametrize("sampler_cls, ok", [(Sampler, True), (_AlwaysAccept, False)])
def test_verified_tokens_follow_the_target_distribution(params, draft, sampler_cls, ok):
    p = _target(**params)
    s = sampler_cls(len(LOGITS), "cpu", seed=1)
    out = s(LOGITS.expand(N, -1).contiguous(), _rows(draft, **params))
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=len(LOGITS)).double()
    support = p > 0
    assert counts[~support].sum() == 0 or not ok
    expected = p[support].double()
    expected = expected / expected.sum() * N
    observed = counts[support]
    if observed.sum() != N:  # tokens outside p's support were emitted: wrong already
        assert not ok
        return
    pval = chisquare(observed.numpy(), expected.numpy()).pvalue
    assert (pval > 0.01) == ok, (pval, observed.tolist(), expected.tolist())


def test_greedy_rows_take_the_argmax_whatever_is_proposed():
    x = torch.tensor([[0.0, 3.0, 1.0], [0.0, 3.0, 1.0]])
    p = SamplingParams(temperature=0)
    rows = [SamplingRow(p, [], [], None, frozenset(), 1), SamplingRow(p, [], [], None, frozenset(), 2)]
    assert Sampler(3, "cpu")(x, rows).token_ids == [1, 1]


def test_seeded_rows_with_proposals_are_reproducible_and_batch_independent():
    torch.manual_seed(0)
    x = torch.randn(4, 50)
    p = SamplingParams(temperature=1.0, seed=5)

    def draw(order):
        rows = [SamplingRow(p, [], [], request_generator(p, "cpu"), frozenset(), 7) if i == 2 else
                row(temperature=1.0) for i in order]
        out = Sampler(50, "cpu", seed=len(order))(x[order], rows)
        return out.token_ids[order.index(2)]

    first = [draw([0, 1, 2, 3]) for _ in range(3)]
    assert len(set(first)) == 1
    assert draw([2]) == first[0] == draw([3, 2, 0])
