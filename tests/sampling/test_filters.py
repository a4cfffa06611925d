import math

import pytest
import torch

from batchlm.sampling.filters import apply_min_p, apply_temperature, apply_top_k_top_p


def kept(logits_row):
    return {i for i, v in enumerate(logits_row.tolist()) if v != float("-inf")}


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
    out = apply_top_k_top_p(LOGITS.clone(), [-1], [top_p])
    assert kept(out[0]) == expected
    # kept logits are unchanged
    for i in expected:
        assert out[0, i] == LOGITS[0, i]


@pytest.mark.parametrize("k,expected", [(1, {2}), (2, {2, 0}), (3, {2, 0, 3}), (4, {0, 1, 2, 3}), (-1, {0, 1, 2, 3}),
                                        (100, {0, 1, 2, 3})])
def test_top_k(k, expected):
    assert kept(apply_top_k_top_p(LOGITS.clone(), [k], [1.0])[0]) == expected


def test_top_p_applies_on_renormalised_top_k():
    # after top_k=2: probs 0.5/0.8, 0.3/0.8 = 0.625, 0.375; top_p=0.6 keeps only token 2
    assert kept(apply_top_k_top_p(LOGITS.clone(), [2], [0.6])[0]) == {2}
    # without top_k, top_p=0.6 keeps {2, 0}
    assert kept(apply_top_k_top_p(LOGITS.clone(), [-1], [0.6])[0]) == {2, 0}


def test_mixed_rows_and_sort_path():
    x = torch.randn(3, 5000)
    out = apply_top_k_top_p(x.clone(), [5, -1, 4500], [1.0, 0.5, 1.0])  # 4500 > topk cap: sort path
    assert kept(out[0]) == set(x[0].topk(5).indices.tolist())
    assert len(kept(out[2])) == 4500
    p = x[1].softmax(-1).sort(descending=True).values
    n = int((p.cumsum(-1) < 0.5).sum()) + 1
    assert len(kept(out[1])) == n


def test_top_k_top_p_match_transformers():
    tf = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    x = torch.randn(4, 300) * 3
    for top_p in (0.3, 0.9):
        hf = tf.TopPLogitsWarper(top_p)(None, x.clone())
        ours = apply_top_k_top_p(x.clone(), [-1] * 4, [top_p] * 4)
        assert torch.equal(torch.isinf(hf), torch.isinf(ours))
    hf = tf.TopKLogitsWarper(7)(None, x.clone())
    ours = apply_top_k_top_p(x.clone(), [7] * 4, [1.0] * 4)
    assert torch.equal(torch.isinf(hf), torch.isinf(ours))


def test_min_p():
    x = LOGITS.clone()
    apply_min_p(x, [0.5])  # threshold 0.25: keeps 0.5, 0.3
    assert kept(x[0]) == {2, 0}
    x = LOGITS.clone()
    apply_min_p(x, [0.0])
    assert kept(x[0]) == {0, 1, 2, 3}
    x = LOGITS.clone()
    apply_min_p(x, [1.0])
    assert kept(x[0]) == {2}


def test_min_p_matches_transformers():
    tf = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(1)
    x = torch.randn(4, 300) * 2
    hf = tf.MinPLogitsWarper(0.1)(None, x.clone())
    ours = x.clone()
    apply_min_p(ours, [0.1] * 4)
    assert torch.equal(torch.isinf(hf), torch.isinf(ours))


def test_temperature():
    x = torch.tensor([[1.0, 2.0], [4.0, -2.0]])
    apply_temperature(x, [0.5, 2.0])
    assert torch.allclose(x, torch.tensor([[2.0, 4.0], [2.0, -1.0]]))
    assert math.isclose(x.softmax(-1)[1, 0].item(), 1 / (1 + math.exp(-3)), rel_tol=1e-6)
