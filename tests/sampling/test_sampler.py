import pytest
import torch

from batchlm.sampling.sampler import Sampler
from batchlm.sampling.types import SamplingRow
from batchlm.sampling_params import SamplingParams

from .helpers import row


def test_greedy_equals_argmax_fast_path():
    torch.manual_seed(0)
    x = torch.randn(7, 100)
    out = Sampler(100, "cpu")(x, [row(temperature=0.0) for _ in range(7)])
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.logprobs == [None] * 7


def test_greedy_argmax_is_argmax_ties_nan_and_strided_rows_included():
    from batchlm.sampling.sampler import greedy_argmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1000, generator=g)
    x[0, [5, 500, 999]] = 7.0  # ties: the first wins
    x[1, :] = 0.0  # all tied
    x[2, [3, 8]] = float("nan")  # NaN counts as the maximum
    x[3, [0, 999]] = float("inf")
    x[4, :] = float("-inf")
    x[5] = torch.randint(0, 3, (1000,), generator=g).float()  # many ties
    for rows in (x, x[:, :997], x[::2]):  # contiguous, padded-vocab slice, strided
        assert torch.equal(greedy_argmax(rows), rows.argmax(-1))


def test_greedy_ignores_filters_and_sees_penalties():
    x = torch.tensor([[1.0, 3.0, 2.0]])
    s = Sampler(3, "cpu")
    assert s(x, [row(temperature=0.0, top_k=1, top_p=0.1, min_p=1.0)]).token_ids == [1]
    # repetition penalty 2 on token 1: 3 -> 1.5 < 2
    assert s(x, [row(output=[1], temperature=0.0, repetition_penalty=2.0)]).token_ids == [2]


def test_padded_vocab_columns_never_chosen_and_input_untouched():
    x = torch.zeros(2, 8)
    x[:, 6:] = 100.0  # padding columns beyond vocab_size=6
    before = x.clone()
    s = Sampler(6, "cpu")
    out = s(x, [row(temperature=0.0, frequency_penalty=1.0, output=[0]), row(temperature=1.0)])
    assert all(t < 6 for t in out.token_ids)
    assert torch.equal(x, before)


def test_min_tokens_blocks_dominant_eos():
    x = torch.tensor([[0.0, 0.0, 50.0, 0.0]] * 2)  # eos = 2 dominates
    s = Sampler(4, "cpu")
    rows = [row(output=[], eos=[2], min_tokens=1, temperature=0.0),
            row(output=[], eos=[2], min_tokens=1, temperature=1.0)]
    assert 2 not in s(x, rows).token_ids
    rows = [row(output=[0], eos=[2], min_tokens=1, temperature=0.0),
            row(output=[0], eos=[2], min_tokens=1, temperature=1.0)]
    assert s(x, rows).token_ids == [2, 2]


def _freqs(tokens, vocab):
    c = torch.bincount(torch.tensor(tokens), minlength=vocab).float()
    return c / c.sum()


def test_sample_frequencies_follow_temperature_scaled_probs():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 20000
    s = Sampler(4, "cpu", seed=123)
    for temp in (1.0, 2.0, 0.5):
        out = s(logits.expand(n, 4), [row(temperature=temp)] * n)  # read-only rows: share one
        expected = (logits / temp).softmax(-1)
        assert torch.allclose(_freqs(out.token_ids, 4), expected, atol=0.015), temp


@pytest.mark.parametrize("params,allowed", [
    (dict(top_k=2), {0, 1}),
    (dict(top_p=0.8), {0, 1}),  # probs .64 .24 .09 .03: .64 < .8 <= .88
    (dict(min_p=0.3), {0, 1}),  # .24 / .64 = .37 >= .3; .09 / .64 < .3
    (dict(top_k=3, min_p=0.1), {0, 1, 2}),
])
def test_filtered_sampling_only_allowed_tokens_with_renormalised_freqs(params, allowed):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -1.5])
    n = 20000
    out = Sampler(5, "cpu", seed=7)(logits.expand(n, 5), [row(**params)] * n)
    assert set(out.token_ids) == allowed
    mask = torch.tensor([i in allowed for i in range(5)])
    expected = logits.masked_fill(~mask, float("-inf")).softmax(-1)
    assert torch.allclose(_freqs(out.token_ids, 5), expected, atol=0.015)


def test_mixed_greedy_and_sampled_rows():
    torch.manual_seed(3)
    x = torch.randn(6, 50)
    rows = [row(temperature=0.0), row(top_k=1), row(temperature=0.0, presence_penalty=0.5),
            row(temperature=0.8, top_k=1, seed=5), row(temperature=0.0), row(top_k=1, top_p=0.5)]
    out = Sampler(50, "cpu")(x, rows)
    # top_k=1 is argmax too, so every row must equal argmax
    assert out.token_ids == x.argmax(-1).tolist()


def test_shared_generator_is_seeded():
    x = torch.zeros(16, 1000)
    rows = [row() for _ in range(16)]
    a = Sampler(1000, "cpu", seed=1)(x, rows).token_ids
    assert a == Sampler(1000, "cpu", seed=1)(x, rows).token_ids
    assert a != Sampler(1000, "cpu", seed=2)(x, rows).token_ids


def _seeded_row(seed, output):
    return row(output=output, seed=seed, temperature=0.9, top_p=0.95, top_k=500, repetition_penalty=1.1)


def test_seeded_row_same_alone_or_anywhere_in_batch():
    vocab, steps = 1000, 6
    torch.manual_seed(0)
    step_logits = [torch.randn(vocab) * 0.5 for _ in range(steps)]  # flat: draws vary a lot

    def run(position, batch_size, seed=42):
        sampler = Sampler(vocab, "cpu", seed=position)  # shared generator differs per run too
        target = _seeded_row(seed, [])
        others = [
            lambda: row(seed=7, temperature=1.3),
            lambda: row(temperature=1.0, min_p=0.01),
            lambda: row(temperature=0.0),
            lambda: row(seed=42, temperature=0.7, top_k=3),  # same seed, own generator
        ]
        batch_others = [f() for f in others[: batch_size - 1]]
        tokens = []
        for logits in step_logits:
            rows = list(batch_others)
            rows.insert(position, target)
            x = torch.randn(len(rows), vocab)
            x[position] = logits
            t = sampler(x, rows).token_ids[position]
            target.output_token_ids.append(t)  # feeds the repetition penalty next step
            tokens.append(t)
        return tokens

    alone = run(0, 1)
    assert len(set(alone)) > 1
    for position in (0, 2, 4):
        assert run(position, 5) == alone, position
    assert run(0, 1, seed=43) != alone


def test_seeded_n_rows_batch_of_many():
    # many seeded rows at once give the same tokens as each alone
    vocab = 300
    torch.manual_seed(1)
    x = torch.randn(8, vocab)
    s = Sampler(vocab, "cpu")
    batch = s(x, [row(seed=i, temperature=1.0) for i in range(8)]).token_ids
    alone = [s(x[i:i + 1], [row(seed=i, temperature=1.0)]).token_ids[0] for i in range(8)]
    assert batch == alone
    assert len(set(batch)) > 1


def test_shape_errors():
    s = Sampler(10, "cpu")
    with pytest.raises(ValueError):
        s(torch.zeros(2, 10), [row()])
    with pytest.raises(ValueError):
        s(torch.zeros(1, 9), [row()])
