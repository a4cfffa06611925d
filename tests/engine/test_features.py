"""Engine features on a tiny random Llama: sampling options, stop rules,
logprobs against transformers, classification, bad input."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig

from batchlm import LLM, SamplingParams

from .helpers import EOS, tiny_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d, model = tiny_model_dir(tmp_path_factory.mktemp("llama"), LlamaConfig)
    llm = LLM(model=d, dtype="float32", kv_cache_memory=1 << 24, max_model_len=200)
    return llm, model


def _prompts(k=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (k,), generator=g)]


def test_seeded_sampling_is_independent_of_batch_composition(tiny):
    llm, _ = tiny
    target = _prompts(1, seed=11)[0]
    sp = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([target], sp, use_tqdm=False)[0].outputs[0].token_ids
    others = _prompts(5, seed=12)
    mixed_params = [SamplingParams(temperature=0.8, max_tokens=25, seed=i) for i in range(3)] + [
        SamplingParams(temperature=1.0, max_tokens=7), SamplingParams(temperature=0, max_tokens=3)]
    batch = others[:2] + [target] + others[2:]
    params = mixed_params[:2] + [sp] + mixed_params[2:]
    mixed = llm.generate(batch, params, use_tqdm=False)[2].outputs[0].token_ids
    assert mixed == alone
    other_seed = llm.generate([target], sp.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_samples_share_the_prompt(tiny):
    llm, _ = tiny
    prompt = _prompts(1, seed=5)[0] * 3  # 3 full blocks or more
    hits_before = llm.engine.block_manager.hit_tokens
    out = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 12 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # different samples
    # the three later samples took the prompt's full blocks from the cache
    assert llm.engine.block_manager.hit_tokens - hits_before >= 3 * (len(prompt) - 1) // 16 * 16


def test_stop_token_ids_max_tokens_min_tokens_ignore_eos(tiny):
    llm, _ = tiny
    p = _prompts(1, seed=8)[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0]
    toks = free.outputs[0].token_ids
    assert len(toks) == 30 and free.outputs[0].finish_reason == "length"
    stop_at = toks[5]
    first = toks.index(stop_at)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                           stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == toks[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens keeps the stop id from ending it early (it is suppressed, so the text changes)
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, min_tokens=first + 2,
                                           stop_token_ids=[stop_at]), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= first + 2
    assert stop_at not in out.token_ids[:first + 2]


def test_stop_strings_are_cut_from_the_text(tiny):
    llm, _ = tiny
    p = _prompts(1, seed=9)[0]
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = llm.generate([p], sp, use_tqdm=False)[0].outputs[0]
    text = full.text
    assert len(text) >= 10
    stop = text[6:9]
    cut = text.index(stop)
    out = llm.generate([p], sp.clone(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:cut]
    assert len(out.token_ids) < len(full.token_ids)
    kept = llm.generate([p], sp.clone(stop=stop, include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == text[:cut + len(stop)]


def test_logprobs_match_transformers(tiny):
    llm, model = tiny
    p = _prompts(1, seed=10)[0]
    out = llm.generate([p], SamplingParams(temperature=0, max_tokens=6, logprobs=3, prompt_logprobs=2,
                                           ignore_eos=True), use_tqdm=False)[0]
    full = p + out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
    for i, lp in enumerate(out.outputs[0].logprobs):
        pos = len(p) - 1 + i
        tok = full[pos + 1]
        assert math.isclose(lp[tok], ref[pos, tok].item(), rel_tol=1e-4, abs_tol=1e-4)
        top = torch.topk(ref[pos], 3).indices.tolist()
        assert set(top) <= set(lp)
    plp = out.prompt_logprobs
    assert len(plp) == len(p) and plp[0] is None
    for pos in range(1, len(p)):
        assert math.isclose(plp[pos][p[pos]], ref[pos - 1, p[pos]].item(), rel_tol=1e-4, abs_tol=1e-4)
    lps = [lp[t] for lp, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids)]
    assert math.isclose(out.outputs[0].cumulative_logprob, sum(lps), rel_tol=1e-5)


def test_classify_matches_transformers_likelihoods(tiny):
    llm, model = tiny
    prompts = ["the cat sat on the", "an apple a day"]
    labels = ["mat", "doctor", "x"]
    res = llm.classify(prompts, labels, use_tqdm=False)
    tok = llm.get_tokenizer()
    for prompt, r in zip(prompts, res):
        ids = tok.encode(prompt)
        ref = []
        for lab in labels:
            lab_ids = tok.encode(lab, add_special_tokens=False)
            full = ids + lab_ids
            with torch.no_grad():
                lsm = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
            ref.append(sum(lsm[len(ids) - 1 + j, t].item() for j, t in enumerate(lab_ids)))
        assert r.logprobs == pytest.approx(ref, rel=1e-4, abs=1e-4)
        assert sum(r.probs) == pytest.approx(1.0)
        assert r.label == labels[max(range(3), key=ref.__getitem__)]


def test_bad_requests_fail_alone(tiny):
    llm, _ = tiny
    good = _prompts(2, seed=13)
    too_long = list(range(250))
    outs = llm.generate([good[0], "", too_long, good[1]], SamplingParams(temperature=0, max_tokens=5),
                        use_tqdm=False)
    assert outs[1].error == "the prompt is empty" and outs[1].outputs[0].finish_reason == "error"
    assert "250 tokens" in outs[2].error and "max_model_len=200" in outs[2].error
    assert all(len(o.outputs[0].token_ids) > 0 for o in (outs[0], outs[3]))
    trunc = llm.generate([too_long], SamplingParams(temperature=0, max_tokens=5, truncate_prompt_tokens=100),
                         use_tqdm=False)[0]
    assert trunc.error is None and trunc.prompt_token_ids == too_long[-100:]
    assert not llm.engine.has_unfinished_requests()


def test_max_model_len_ends_generation(tiny):
    llm, _ = tiny
    out = llm.generate([list(range(190))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-3), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(min_p=2), "min_p"), (dict(n=0), "n"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"), (dict(presence_penalty=3), "presence_penalty"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{field} must be"):
        SamplingParams(**kwargs)


def test_engine_api_streaming_and_abort(tiny):
    llm, _ = tiny
    eng = llm.engine
    ps = _prompts(3, seed=14)
    for i, p in enumerate(ps):
        eng.add_request(f"s{i}", p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with pytest.raises(ValueError, match="already in the engine"):
        eng.add_request("s0", ps[0])
    eng.step()
    eng.abort_request("s1")
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            done[o.request_id] = o
    assert set(done) == {"s0", "s2"}
    assert all(len(o.outputs[0].token_ids) == 8 for o in done.values())
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_chat_applies_the_template(tiny):
    llm, _ = tiny
    conv = [{"role": "user", "content": "hi"}]
    out = llm.chat([conv], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]
    assert llm.get_tokenizer().decode(out.prompt_token_ids) == "<user>hi\n<assistant>"


def test_unknown_model_paths_are_clear():
    with pytest.raises((FileNotFoundError, ValueError), match="no-such-model"):
        LLM(model="/nonexistent/no-such-model")


def test_classify_takes_token_ids_like_generate(tiny):
    llm, _ = tiny
    tok = llm.get_tokenizer()
    prompts = ["the cat sat on the", "an apple a day"]
    ids = [tok.encode(p) for p in prompts]
    labels = ["mat", "doctor"]
    by_text = llm.classify(prompts, labels, use_tqdm=False)
    by_ids = llm.classify(ids, labels, use_tqdm=False)
    one = llm.classify(ids[1], labels, use_tqdm=False)  # a single token-id prompt, as generate takes it
    assert [r.probs for r in by_ids] == [r.probs for r in by_text]
    assert one[0].probs == pytest.approx(by_text[1].probs, rel=1e-6)  # another batch: same maths
    assert [r.prompt_token_ids for r in by_ids] == ids and by_ids[0].prompt is None
    assert llm.classify([[]], labels, use_tqdm=False)[0].error == "the prompt is empty"
    with pytest.raises(TypeError, match="string or a list of token ids"):
        llm.classify([3.5], labels, use_tqdm=False)
