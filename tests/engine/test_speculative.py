"""Speculative decoding (n-gram) in the engine, on tiny random Llamas: greedy
outputs equal those without speculation with every sampling feature on,
nothing past max_tokens or a stop, seeds, and a distribution test that can
fail (rejection sampling vs plain sampling, and a broken rule that fails it)."""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chi2_contingency
from transformers import LlamaConfig

from batchlm import LLM, SamplingParams
from batchlm.sampling.sampler import Sampler

from .helpers import tiny_model_dir

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same tiny Llama with and without speculation."""
    d, _ = tiny_model_dir(tmp_path_factory.mktemp("llama"), LlamaConfig)
    kw = dict(dtype="float32", kv_cache_memory=1 << 24, max_model_len=200)
    return LLM(model=d, **kw), LLM(model=d, speculative_config=NGRAM, **kw)


def _prompts(k=6, seed=3):
    """Prompts that repeat themselves (so that prompt lookup has something to find)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        unit = torch.randint(0, 256, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        out.append((unit * 12)[:30 + 5 * i])
    return out


def _run(llm, prompts, params):
    """Outputs, and (proposed, accepted) during this call."""
    before = (llm.engine.spec_stats.proposed, llm.engine.spec_stats.accepted)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    return outs, (llm.engine.spec_stats.proposed - before[0], llm.engine.spec_stats.accepted - before[1])


@pytest.mark.parametrize("name, params", [
    ("plain", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)),
    ("eos-stops", SamplingParams(temperature=0, max_tokens=40)),
    ("n2-logprobs", SamplingParams(n=2, temperature=0, max_tokens=25, logprobs=3, prompt_logprobs=2,
                                   ignore_eos=True)),
    ("penalties", SamplingParams(temperature=0, max_tokens=30, repetition_penalty=1.3, frequency_penalty=0.2,
                                 presence_penalty=0.1, ignore_eos=True)),
    ("min-tokens", SamplingParams(temperature=0, max_tokens=30, min_tokens=12, stop_token_ids=[5, 17, 200])),
    ("short", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
])
def test_greedy_outputs_equal_those_without_speculation(pair, name, params):
    plain, spec = pair
    prompts = _prompts()
    ref, _ = _run(plain, prompts, params)
    got, (proposed, accepted) = _run(spec, prompts, params)
    # penalties steer away from repeating: proposals are made, rarely accepted; three
    # tokens are mostly too few for the model to repeat itself
    if name != "short":
        assert proposed > 0 and (accepted > 0 or name == "penalties"), "speculation did not run"
    for r, o in zip(ref, got):
        for a, b in zip(r.outputs, o.outputs):
            assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
            assert b.text == a.text
            if params.logprobs is not None:
                assert len(b.logprobs) == len(b.token_ids)
                for la, lb in zip(a.logprobs, b.logprobs):
                    assert set(la) == set(lb)
                    assert all(math.isclose(la[t], lb[t], rel_tol=1e-4, abs_tol=1e-4) for t in la)
        if params.prompt_logprobs is not None:
            assert len(o.prompt_logprobs) == len(r.prompt_logprobs)
    if name == "min-tokens":
        assert all(len(o.outputs[0].token_ids) >= 12 for o in got)


def test_nothing_past_max_tokens_or_a_stop(pair):
    plain, spec = pair
    prompts = _prompts(4, seed=5)
    free, _ = _run(plain, prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    for max_tokens in (1, 2, 5, 9):
        outs, _ = _run(spec, prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        for o, f in zip(outs, free):
            assert o.outputs[0].token_ids == f.outputs[0].token_ids[:max_tokens]
            assert o.outputs[0].finish_reason == "length"
    for o, f in zip(prompts, free):
        toks = f.outputs[0].token_ids
        stop_at = toks[10]
        first = toks.index(stop_at)
        out = spec.generate([o], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
        assert out.token_ids == toks[:first + 1] and out.finish_reason == "stop"
        text = plain.get_tokenizer().decode(toks)
        stop = text[-8:-4] if len(text) >= 8 else None
        if stop:
            out = spec.generate([o], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                                use_tqdm=False)[0].outputs[0]
            ref = plain.generate([o], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                                 use_tqdm=False)[0].outputs[0]
            assert (out.text, out.token_ids, out.finish_reason) == (ref.text, ref.token_ids, ref.finish_reason)


def test_mixed_batch_greedy_rows_unchanged_and_seeds_reproducible(pair):
    plain, spec = pair
    prompts = _prompts(6, seed=7)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sampled = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=100 + i, max_tokens=20,
                              ignore_eos=True) for i in range(3)]
    params = [greedy, sampled[0], greedy, sampled[1], greedy, sampled[2]]
    ref, _ = _run(plain, prompts, greedy)
    got, _ = _run(spec, prompts, params)
    for i in (0, 2, 4):
        assert got[i].outputs[0].token_ids == ref[i].outputs[0].token_ids
    # a seeded request gives the same tokens alone and in any batch
    alone, _ = _run(spec, [prompts[3]], sampled[1])
    assert alone[0].outputs[0].token_ids == got[3].outputs[0].token_ids
    again, _ = _run(spec, prompts[::-1], params[::-1])
    assert [o.outputs[0].token_ids for o in again[::-1]] == [o.outputs[0].token_ids for o in got]


def test_classification_is_unchanged_by_speculation(pair):
    plain, spec = pair
    prompts, labels = ["the cat sat on the", "an apple a day"], ["mat", "doctor", "x"]
    ref = plain.classify(prompts, labels, use_tqdm=False)
    got = spec.classify(prompts, labels, use_tqdm=False)
    for r, g in zip(ref, got):
        assert g.logprobs == pytest.approx(r.logprobs, rel=1e-5, abs=1e-5) and g.label == r.label


def test_a_large_batch_does_not_speculate(pair):
    plain, _ = pair
    llm = LLM(model=plain.model_dir, dtype="float32", kv_cache_memory=1 << 24, max_model_len=200,
              speculative_config={**NGRAM, "disable_by_batch_size": 5})
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    _run(llm, _prompts(6), params)  # six decodes in every step: more than 5
    assert llm.engine.spec_stats.proposed == 0
    _run(llm, _prompts(5), params)
    assert llm.engine.spec_stats.proposed > 0


def test_proposal_lengths_follow_each_sequences_acceptance(pair):
    # A repeating prompt: prompt lookup proposes k tokens that a random model mostly rejects, so the
    # sequence's length drops to 1 (accepted + 1) and proposes less than k per verification.
    _, spec = pair
    k = NGRAM["num_speculative_tokens"]
    before = spec.engine.spec_stats.verifications
    outs, (proposed, accepted) = _run(spec, _prompts(1), SamplingParams(temperature=0, max_tokens=40,
                                                                      ignore_eos=True))
    verifications = spec.engine.spec_stats.verifications - before
    assert verifications > 0 and proposed > 0
    if accepted < proposed:  # something was rejected: later verifications proposed fewer than k
        assert proposed < k * verifications
    else:
        assert proposed > verifications  # all accepted: lengths stayed above one


def test_a_draft_model_that_cannot_serve_is_refused_clearly(pair, tmp_path):
    from transformers import AutoTokenizer

    plain, _ = pair
    with pytest.raises(ValueError, match="speculative_config.model: cannot load the draft model '/nonexistent/x'"):
        LLM(model=plain.model_dir, speculative_config={"method": "draft", "model": "/nonexistent/x",
                                                       "num_speculative_tokens": 2})
    other, _ = tiny_model_dir(tmp_path, LlamaConfig, seed=2)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="speculative_config.model: the draft model .* has another tokenizer"):
        LLM(model=plain.model_dir, speculative_config={"method": "draft", "model": other,
                                                       "num_speculative_tokens": 2})


def test_draft_model_speculation_keeps_greedy_outputs_and_frees_everything(pair):
    plain, _ = pair
    llm = LLM(model=plain.model_dir, dtype="float32", kv_cache_memory=1 << 24, max_model_len=200,
              speculative_config={"method": "draft", "model": plain.model_dir, "num_speculative_tokens": 4})
    prompts = _prompts(6, seed=11)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (1, 2, 7, 20, 33, 40)]
    ref, _ = _run(plain, prompts, params)
    got, (proposed, accepted) = _run(llm, prompts, params)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    assert proposed > 0 and accepted == proposed  # the model is its own draft: every guess is right


# ---- the distribution test ----------------------------------------------------------


class _ResampleKeepsDraft(Sampler):
    """A classic mistake: decide as rejection sampling does, but on rejection
    draw from p itself (the proposal is not removed), so it is over-sampled."""

    def _accept_drafts(self, e, rows, drafts, u):
        saved = e[rows, drafts].clone()
        accepted = super()._accept_drafts(e, rows, drafts, u)
        e[rows, drafts] = saved
        return accepted


@pytest.fixture(scope="module")
def peaked(tmp_path_factory):
    """A tiny Llama with a sharper head (so that proposals are often likely),
    and a prompt ending in its own greedy continuation, loops included (so
    that prompt lookup proposes what the model tends to say)."""
    d, model = tiny_model_dir(tmp_path_factory.mktemp("peaked"), LlamaConfig, seed=4, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(d, safe_serialization=True)
    kw = dict(dtype="float32", kv_cache_memory=1 << 24, max_model_len=128, max_num_seqs=256)
    plain = LLM(model=d, **kw)
    seed_prompt = list(range(40, 48))
    cont = plain.generate([seed_prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    return d, kw, plain, seed_prompt + cont, {}  # the last: plain samples per filter setting


N_SAMPLES = 3000
NEW_TOKENS = 4


def _counts(outs, pos):
    out = {}
    for o in outs:
        t = o.outputs[0].token_ids[pos]
        out[t] = out.get(t, 0) + 1
    return out


def _chi2_p(a: dict, b: dict) -> float:
    """Two-sample chi-square p-value; tokens seen fewer than 10 times in all are pooled."""
    keys = sorted(set(a) | set(b))
    big = [k for k in keys if a.get(k, 0) + b.get(k, 0) >= 10]
    rest = [k for k in keys if k not in big]
    table = [[a.get(k, 0) for k in big], [b.get(k, 0) for k in big]]
    if rest:
        table[0].append(sum(a.get(k, 0) for k in rest))
        table[1].append(sum(b.get(k, 0) for k in rest))
    return chi2_contingency(table)[1]


@pytest.mark.parametrize("proposer, filters", [
    ("ngram", dict()), ("ngram", dict(top_p=0.9)), ("draft", dict()),
    ("draft", dict(top_k=30, min_p=0.02, repetition_penalty=1.2, presence_penalty=0.3)),
], ids=["ngram-t1", "ngram-t1-top_p0.9", "draft-t1", "draft-t1-topk-minp-penalties"])
@pytest.mark.parametrize("rule", ["rejection", "broken"])
def test_sampled_tokens_keep_the_models_distribution(peaked, proposer, filters, rule):
    d, kw, plain, prompt, plain_samples = peaked
    # the draft is the model itself: greedy guesses, accepted with probability p(guess)
    spec_config = NGRAM if proposer == "ngram" else {"method": "draft", "model": d, "num_speculative_tokens": 4}
    spec = LLM(model=d, speculative_config={**spec_config, "disable_by_batch_size": 1024}, **kw)
    if rule == "broken":
        spec.engine.sampler = _ResampleKeepsDraft(spec.engine.sampler.vocab_size, "cpu")

    def params(seed):
        return SamplingParams(temperature=1.0, seed=seed, max_tokens=NEW_TOKENS, ignore_eos=True, **filters)

    key = repr(filters)
    if key not in plain_samples:
        plain_samples[key] = plain.generate([prompt] * N_SAMPLES, [params(i) for i in range(N_SAMPLES)],
                                            use_tqdm=False)
    ref = plain_samples[key]
    got = spec.generate([prompt] * N_SAMPLES, [params(N_SAMPLES + i) for i in range(N_SAMPLES)],
                        use_tqdm=False)
    stats = spec.engine.spec_stats
    assert stats.proposed > N_SAMPLES and stats.accepted > N_SAMPLES // 10, stats.as_dict()
    # The first token comes from the prompt's last row (nothing to verify yet); the others were verified.
    p_values = [_chi2_p(_counts(ref, pos), _counts(got, pos)) for pos in range(1, NEW_TOKENS)]
    if rule == "rejection":
        assert min(p_values) > 0.01, p_values
    else:
        assert min(p_values) < 0.01, f"the broken rule passed: {p_values}"
