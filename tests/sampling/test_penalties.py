import pytest
import torch

from batchlm.sampling.penalties import apply_penalties, suppress_min_tokens

from .helpers import row

NEG_INF = float("-inf")


def test_repetition_penalty_hand_computed():
    x = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0]])
    r = row(prompt=[0, 1], output=[1, 4, 4], repetition_penalty=2.0)
    apply_penalties(x, [r], [0])
    # seen: 0 (prompt), 1 (both), 4 (output, twice -> penalised once)
    assert x.tolist() == [[1.0, -2.0, 0.5, 3.0, -8.0]]


def test_frequency_presence_hand_computed():
    x = torch.zeros(1, 5)
    r = row(prompt=[0, 1, 2], output=[3, 3, 3, 1], frequency_penalty=0.5, presence_penalty=0.25)
    apply_penalties(x, [r], [0])
    # output only: token 3 count 3 -> -(1.5 + .25); token 1 count 1 -> -(0.5 + .25); prompt ignored
    assert x.tolist() == [[0.0, -0.75, 0.0, -1.75, 0.0]]


def test_all_penalties_together_order():
    x = torch.tensor([[4.0, -2.0, 1.0]])
    r = row(prompt=[0], output=[1, 1], repetition_penalty=2.0, frequency_penalty=1.0, presence_penalty=0.5)
    apply_penalties(x, [r], [0])
    # rep first: [2, -4, 1]; then token 1: -4 - 2*1 - 0.5 = -6.5
    assert x.tolist() == [[2.0, -6.5, 1.0]]


def test_only_listed_rows_change_and_big_ids_ignored():
    x = torch.ones(3, 4)
    rows = [row(output=[0], frequency_penalty=1.0),
            row(output=[0], frequency_penalty=1.0),
            row(output=[2, 99], presence_penalty=1.0)]  # 99 >= V is ignored
    apply_penalties(x, rows, [0, 2])
    assert x.tolist() == [[0.0, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0.0, 1]]


def test_repetition_penalty_matches_transformers():
    tf = pytest.importorskip("transformers.generation.logits_process")
    torch.manual_seed(0)
    vocab = 50
    prompts = [[1, 2, 3, 4], [5, 5, 6, 7]]
    outputs = [[8, 1, 9], [10, 11, 5]]
    x = torch.randn(2, vocab) * 3
    for pen in (1.3, 0.7):
        ids = torch.tensor([p + o for p, o in zip(prompts, outputs)])
        hf = tf.RepetitionPenaltyLogitsProcessor(pen)(ids, x.clone())
        ours = x.clone()
        rows = [row(prompt=p, output=o, repetition_penalty=pen) for p, o in zip(prompts, outputs)]
        apply_penalties(ours, rows, [0, 1])
        assert torch.allclose(ours, hf)
        assert not torch.allclose(ours, x)


def test_min_tokens_suppresses_eos_and_stop_ids():
    x = torch.zeros(4, 6)
    rows = [
        row(output=[1], eos=[5], min_tokens=3, stop_token_ids=[2]),  # 1 < 3: suppress 2, 5
        row(output=[1, 1, 1], eos=[5], min_tokens=3, stop_token_ids=[2]),  # reached: nothing
        row(output=[], eos=[5], min_tokens=2, ignore_eos=True, stop_token_ids=[3]),  # eos kept
        row(output=[], eos=[5, 4], min_tokens=1),
    ]
    suppress_min_tokens(x, rows, [0, 1, 2, 3])
    inf = [[j for j, v in enumerate(r) if v == NEG_INF] for r in x.tolist()]
    assert inf == [[2, 5], [], [3], [4, 5]]
