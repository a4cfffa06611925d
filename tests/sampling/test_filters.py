import math

import pytest
import torch

from batchlm.sampling import filters
from batchlm.sampling.filters import apply_temperature, filter_probs_


def e_of(logits):
    """Unnormalised probs, row max 1, as the sampler feeds the filters."""
    return (logits - logits.amax(-1, keepdim=True)).exp()


def kept_after(logits, top_k=None, top_p=None, min_p=None):
    e = e_of(logits)
    b = e.shape[0]
    filter_probs_(e, top_k or [-1] * b, top_p or [1.0] * b, min_p or [0.0] * b)
    return [{i for i, v in enumerate(row) if v > 0} for row in e.tolist()]


# probs 0.5, 0.3, 0.15, 0.05 in a shuffled order: token 2 > 0 > 3 > 1
PROBS = torch.tensor([0.3, 0.05, 0.5, 0.15])
LOGITS = PROBS.log().unsqueeze(0)  # [1, 4]


@pytest.mark.parametrize("top_p,expected", [
    (0.2, {2}),  # top token always kept
    (0.5 - 1e-3, {2}),
    (0.75, {2, 0}),
    (0.81, {2, 0, 3}),
    (0.96, {2, 0, 3, 1}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_smallest_set_reaching_p(top_p, expected):
    assert kept_after(LOGITS, top_p=[top_p]) == [expected]


def test_kept_values_unchanged():
    e = e_of(LOGITS)
    before = e.clone()
    filter_probs_(e, [3], [0.9], [0.2])
    assert torch.equal(e[e > 0], before[e > 0])


@pytest.mark.parametrize("k,expected", [(1, {2}), (2, {2, 0}), (3, {2, 0, 3}), (4, {0, 1, 2, 3}),
                                        (-1, {0, 1, 2, 3}), (100, {0, 1, 2, 3})])
def test_top_k(k, expected):
    assert kept_after(LOGITS, top_k=[k]) == [expected]


def test_top_p_applies_on_renormalised_top_k():
    # after top_k=2: probs 0.5/0.8 = 0.625, 0.375; top_p=0.6 keeps only token 2
    assert kept_after(LOGITS, top_k=[2], top_p=[0.6]) == [{2}]
    # without top_k, top_p=0.6 keeps {2, 0}
    assert kept_after(LOGITS, top_p=[0.6]) == [{2, 0}]


@pytest.mark.parametrize("min_p,expected", [(0.5, {2, 0}), (0.0, {0, 1, 2, 3}), (1.0, {2}), (0.09, {2, 0, 3, 1})])
def test_min_p(min_p, expected):
    # threshold min_p * 0.5: 0.5 -> 0.25 keeps .5/.3; 0.09 -> 0.045 keeps all
    assert kept_after(LOGITS, min_p=[min_p]) == [expected]


def _brute_force_top_p(row, p):
    probs = row.softmax(-1)
    sorted_p, order = probs.sort(descending=True)
    n = int(((sorted_p.cumsum(-1) - sorted_p) < p).sum())
    return set(order[:n].tolist())


def test_mixed_rows_candidates_and_sort_fallback(monkeypatch):
    monkeypatch.setattr(filters, "_MIN_CANDIDATES", 64)
    torch.manual_seed(0)
    x = torch.randn(4, 3000)
    x[3] *= 8  # peaked: the top-p cut fits in 64 candidates
    kept = kept_after(x, top_k=[5, -1, 2500, -1], top_p=[1.0, 0.5, 1.0, 0.9], min_p=[0.0, 0.0, 0.0, 0.0])
    assert kept[0] == set(x[0].topk(5).indices.tolist())
    assert kept[1] == _brute_force_top_p(x[1], 0.5)  # flat row: needs > 64, falls back to sort
    assert len(kept[1]) > 64
    assert kept[2] == set(x[2].topk(2500).indices.tolist())
    assert kept[3] == _brute_force_top_p(x[3], 0.9)
    assert len(kept[3]) < 64


def test_row_threshold_independent_of_batch():
    torch.manual_seed(4)
    x = torch.randn(5, 2000) * 3
    alone = kept_after(x[2:3], top_k=[300], top_p=[0.9])[0]
    batch = kept_after(x, top_k=[-1, 5000, 300, 7, -1], top_p=[0.99, 0.5, 0.9, 1.0, 0.3])[2]
    assert alone == batch


def test_filters_match_transformers():
    tf = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    x = torch.randn(4, 300) * 3

    def removed(e):
        return e == 0

    for top_p in (0.3, 0.9):
        hf = tf.TopPLogitsWarper(top_p)(None, x.clone())
        e = e_of(x)
        filter_probs_(e, [-1] * 4, [top_p] * 4, [0.0] * 4)
        assert torch.equal(torch.isinf(hf), removed(e))
    hf = tf.TopKLogitsWarper(7)(None, x.clone())
    e = e_of(x)
    filter_probs_(e, [7] * 4, [1.0] * 4, [0.0] * 4)
    assert torch.equal(torch.isinf(hf), removed(e))
    hf = tf.MinPLogitsWarper(0.1)(None, x.clone())
    e = e_of(x)
    filter_probs_(e, [-1] * 4, [1.0] * 4, [0.1] * 4)
    assert torch.equal(torch.isinf(hf), removed(e))


def test_temperature():
    x = torch.tensor([[1.0, 2.0], [4.0, -2.0]])
    apply_temperature(x, [0.5, 2.0])
    assert torch.allclose(x, torch.tensor([[2.0, 4.0], [2.0, -1.0]]))
    assert math.isclose(x.softmax(-1)[1, 0].item(), 1 / (1 + math.exp(-3)), rel_tol=1e-6)
