import pytest
import torch

from batchlm.sampling import logprobs as lp_mod
from batchlm.sampling.logprobs import prompt_logprobs, token_logprobs
from batchlm.sampling.sampler import Sampler

from .helpers import row


def test_sampler_logprobs_are_raw_topk_plus_sampled():
    torch.manual_seed(0)
    vocab = 40
    x = torch.randn(4, vocab) * 2
    ref = x.log_softmax(-1)
    rows = [
        row(logprobs=3, temperature=0.5, repetition_penalty=1.5, output=[int(x[0].argmax())]),
        row(),  # no logprobs
        row(logprobs=0, temperature=0.0, frequency_penalty=2.0, output=[int(x[2].argmax())] * 3),
        row(logprobs=5, temperature=2.0, top_k=30),
    ]
    out = Sampler(vocab, "cpu", seed=0)(x, rows)
    assert out.logprobs[1] is None
    for i, k in ((0, 3), (2, 0), (3, 5)):
        d, tok = out.logprobs[i], out.token_ids[i]
        topk = set(ref[i].topk(k).indices.tolist()) if k else set()
        assert set(d) == topk | {tok}
        for t, v in d.items():  # raw log_softmax, not the penalised / tempered one
            assert v == pytest.approx(ref[i, t].item(), abs=1e-5)
    # row 2 is greedy but penalised away from the raw argmax, so the dict has
    # only the sampled token and its raw logprob is below the max
    assert out.token_ids[2] != int(x[2].argmax())
    assert out.logprobs[2][out.token_ids[2]] < ref[2].max().item()


def test_prompt_logprobs_match_log_softmax(monkeypatch):
    monkeypatch.setattr(lp_mod, "_CHUNK_ELEMENTS", 64)  # 64 // 30 = 2 rows per chunk
    torch.manual_seed(1)
    n, vocab, k = 5, 30, 2
    x = torch.randn(n, vocab)
    targets = [3, 7, 7, 0, 29]
    ref = x.log_softmax(-1)
    out = prompt_logprobs(x, targets, k)
    assert len(out) == n
    for i, d in enumerate(out):
        top = ref[i].topk(k).indices.tolist()
        assert set(d) == set(top) | {targets[i]}
        for t, v in d.items():
            assert v == pytest.approx(ref[i, t].item(), abs=1e-5)
    assert prompt_logprobs(x, targets, 0) == [{t: pytest.approx(ref[i, t].item(), abs=1e-5)}
                                              for i, t in enumerate(targets)]


def test_token_logprobs_and_bf16_input():
    torch.manual_seed(2)
    x = torch.randn(6, 20) * 4
    targets = [0, 1, 2, 19, 5, 5]
    ref = [x.log_softmax(-1)[i, t].item() for i, t in enumerate(targets)]
    assert token_logprobs(x, targets) == pytest.approx(ref, abs=1e-5)
    xb = x.bfloat16()
    refb = [xb.float().log_softmax(-1)[i, t].item() for i, t in enumerate(targets)]
    assert token_logprobs(xb, targets) == pytest.approx(refb, abs=1e-5)


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        token_logprobs(torch.zeros(2, 5), [1])
    with pytest.raises(ValueError):
        prompt_logprobs(torch.zeros(2, 5), [1, 2, 3], 1)
