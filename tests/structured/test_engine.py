"""Structured outputs in the engine, on a tiny random Llama (garbage unless
constrained) with the byte tokenizer (257 tokens, head padded to 260): every
output parses and validates, at temperature 0 and 1 over many seeds; greedy
output equals transformers' greedy search under the same grammar (an
independent mask path: llguidance's own per-step bitmask); it is unchanged by
batch composition, prefix caching, forced preemption and n-gram speculation;
unconstrained rows are untouched by constrained ones."""
from __future__ import annotations

import json
import math
import re

import jsonschema
import llguidance
import llguidance.hf
import pytest
import torch
from transformers import LlamaConfig, LogitsProcessor, LogitsProcessorList

from batchlm import LLM, SamplingParams, StructuredOutputsParams

from tests.engine.helpers import EOS, tiny_model_dir

# NOTE: every part is bounded (lengths, ranges, multipleOf for decimals: a
# plain "number" allows endless digits, where a random model may loop forever).
NUM = {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.25}  # binary-exact: jsonschema checks it in floats
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "score": NUM,
        "kind": {"enum": ["cat", "dog", "fish"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "owner": {"type": "object", "additionalProperties": False, "required": ["id", "home"],
                  "properties": {"id": {"type": "integer", "minimum": -99, "maximum": 9999},
                                 "home": {"type": "object", "additionalProperties": False,
                                          "required": ["lat", "ok"],
                                          "properties": {"lat": NUM, "ok": {"type": "boolean"}}}}},
    },
    "required": ["name", "age", "score", "kind", "tags", "owner"],
    "additionalProperties": False,
}
JSON = StructuredOutputsParams(json=SCHEMA)
REGEX = r"[a-z]{2,6}-[0-9]{1,3}(\.[0-9]{1,2})?"
CHOICES = ["positive", "negative", "neutral", "n/a"]
MAX = 400  # room for the grammar to finish


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("llama"), LlamaConfig)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model=model_dir[0], dtype="float32", kv_cache_memory=1 << 24, max_model_len=512)


def _prompts(k, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(4, 40, (k,), generator=g)]


def _done(llm):
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def _check_json(out):
    c = out.outputs[0]
    assert c.finish_reason == "stop", (c.finish_reason, c.text)
    assert all(t < 257 for t in c.token_ids)  # never a padded column
    jsonschema.validate(json.loads(c.text), SCHEMA)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_json_output_validates(llm, temperature):
    prompts = _prompts(40, seed=int(temperature * 10))
    params = [SamplingParams(temperature=temperature, seed=i, max_tokens=MAX, structured_outputs=JSON)
              for i in range(40)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for o in outs:
        _check_json(o)
    assert len({o.outputs[0].text for o in outs}) > 10  # real variety: the model chose, not the grammar
    _done(llm)


def test_regex_choice_and_grammar(llm):
    specs = {"regex": StructuredOutputsParams(regex=REGEX),
             "choice": StructuredOutputsParams(choice=CHOICES),
             "grammar": StructuredOutputsParams(grammar='start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]{1,3}/'),
             "json_object": StructuredOutputsParams(json_object=True)}
    prompts = _prompts(30, seed=5)
    for kind, so in specs.items():
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX, structured_outputs=so) for i in range(30)]
        params[0] = params[0].clone(temperature=0.0)
        outs = llm.generate(prompts, params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        if kind == "json_object":  # unbounded: a random model at temperature 1 may not close it
            texts = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
            assert texts[:1] == ["{}"] and len(texts) > 5, texts
            assert all(o.outputs[0].finish_reason in ("stop", "length") for o in outs)
        else:
            assert all(o.outputs[0].finish_reason == "stop" for o in outs), (kind, texts)
        if kind == "regex":
            assert all(re.fullmatch(REGEX, t) for t in texts), texts
        elif kind == "choice":
            assert set(texts) <= set(CHOICES) and len(set(texts)) > 1, texts
        elif kind == "grammar":
            assert all(re.fullmatch(r"yes|no|maybe [0-9]{1,3}", t) for t in texts), texts
        else:
            assert all(isinstance(json.loads(t), dict) for t in texts), texts
    _done(llm)


def test_eos_only_where_the_grammar_accepts(llm):
    """An open-ended regex ends by EOS, drawn only once the text matches; a
    complete grammar ends the row without EOS; ignore_eos and min_tokens don't
    carry a row past its grammar."""
    so = StructuredOutputsParams(regex="[ab]+")
    outs = llm.generate(_prompts(20, seed=9), [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX,
                                                              structured_outputs=so) for i in range(20)],
                        use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop" and c.token_ids[-1] == EOS and re.fullmatch("[ab]+", c.text), c
        assert EOS not in c.token_ids[:-1]
    choice = StructuredOutputsParams(choice=["yes", "no"])
    for extra in (dict(ignore_eos=True), dict(min_tokens=20)):
        c = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=40, structured_outputs=choice,
                                                     **extra), use_tqdm=False)[0].outputs[0]
        assert c.finish_reason == "stop" and c.text in ("yes", "no") and EOS not in c.token_ids, (extra, c)
    _done(llm)


def test_a_row_cut_by_max_tokens_is_length(llm):
    outs = llm.generate(_prompts(4), SamplingParams(temperature=1.0, seed=1, max_tokens=6, structured_outputs=JSON),
                        use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "length" and len(c.token_ids) == 6
        with pytest.raises(ValueError):
            json.loads(c.text)
    _done(llm)


class _GrammarProcessor(LogitsProcessor):
    """transformers' side: one llguidance matcher, mask by its own bitmask bytes."""

    def __init__(self, tokenizer, grammar, prompt_len):
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=260, eos_token=EOS)
        self.m = llguidance.LLMatcher(lltok, grammar)
        self.prompt_len = prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_len:
            assert self.m.consume_token(int(input_ids[0, -1]))
        bits = self.m.compute_bitmask()
        allowed = torch.tensor([(bits[t // 8] >> (t % 8)) & 1 for t in range(scores.shape[1])], dtype=torch.bool)
        return scores.masked_fill(~allowed, -math.inf)


def test_greedy_json_equals_transformers_under_the_same_grammar(llm, model_dir):
    _, hf = model_dir
    tok = llm.engine.tokenizer
    prompts = _prompts(3, seed=21)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX, structured_outputs=JSON),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        proc = _GrammarProcessor(tok, JSON.llguidance_grammar(), len(p))
        x = torch.tensor([p])
        with torch.no_grad():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX, do_sample=False,
                            eos_token_id=EOS, pad_token_id=EOS, logits_processor=LogitsProcessorList([proc]))
        ref = y[0, len(p):].tolist()
        assert ref[-1] == EOS and o.outputs[0].token_ids == ref[:-1]  # the engine ends at the complete grammar
        _check_json(o)


def _mixed(prompts, target_index):
    """Other rows around a constrained greedy row: unconstrained greedy, seeded, and other constrained ones."""
    params = []
    for i in range(len(prompts)):
        if i % 3 == 0:
            params.append(SamplingParams(temperature=0, max_tokens=25, ignore_eos=True))
        elif i % 3 == 1:
            params.append(SamplingParams(temperature=1.0, seed=100 + i, max_tokens=30, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=1.0, seed=i, max_tokens=MAX, structured_outputs=JSON))
    params[target_index] = SamplingParams(temperature=0, max_tokens=MAX, structured_outputs=JSON)
    return params


NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


@pytest.mark.parametrize("mode", ["default", "no-prefix-cache", "preempt", "spec-ngram"])
def test_outputs_unchanged_by_batch_caching_preemption_and_speculation(llm, model_dir, mode):
    d = model_dir[0]
    prompts = _prompts(9, seed=31)
    target, others = 4, [0, 1, 3]  # constrained greedy; unconstrained greedy / seeded rows
    seeded_so = 5  # a seeded constrained row
    ref_target = llm.generate([prompts[target]], SamplingParams(temperature=0, max_tokens=MAX, structured_outputs=JSON),
                              use_tqdm=False)[0].outputs[0].token_ids
    params = _mixed(prompts, target)
    ref_seeded = llm.generate([prompts[seeded_so]], params[seeded_so], use_tqdm=False)[0].outputs[0].token_ids
    kw = dict(dtype="float32", max_model_len=512, kv_cache_memory=1 << 24)
    if mode == "no-prefix-cache":
        kw["enable_prefix_caching"] = False
    elif mode == "spec-ngram":
        kw["speculative_config"] = NGRAM
    elif mode == "preempt":
        per_block = (1 << 24) // llm.engine.block_manager.num_blocks
        # one 256-token row fits (16 blocks); the 9 rows together (~60 blocks) do not
        kw.update(kv_cache_memory=per_block * 18, max_model_len=256)
    other = LLM(model=d, **kw)
    # Unconstrained rows: as this engine gives them alone (speculation changes seeded draws, not greedy ones).
    ref_free = [o.outputs[0].token_ids for o in other.generate([prompts[i] for i in others],
                                                                [params[i] for i in others], use_tqdm=False)]
    proposed = other.engine.spec_stats.proposed
    outs = other.generate(prompts, params, use_tqdm=False)
    assert outs[target].outputs[0].token_ids == ref_target
    assert outs[seeded_so].outputs[0].token_ids == ref_seeded
    assert [outs[i].outputs[0].token_ids for i in others] == ref_free
    for i in range(2, len(prompts), 3):
        _check_json(outs[i])
    if mode == "preempt":
        assert other.engine.scheduler.num_preemptions > 0
    if mode == "spec-ngram":  # unconstrained rows still speculated (constrained ones never do: equal to no-spec)
        assert other.engine.spec_stats.proposed > proposed > 0
    _done(other)


def test_prompt_cache_hits_do_not_change_constrained_output(llm):
    prompt = _prompts(1, seed=41)[0] * 3
    sp = SamplingParams(temperature=0, max_tokens=MAX, structured_outputs=JSON)
    first = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    hits = llm.engine.block_manager.hit_tokens
    again = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.block_manager.hit_tokens > hits and again == first


def test_unconstrained_rows_are_untouched(llm):
    prompts = _prompts(6, seed=51)
    free = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2),
            SamplingParams(temperature=0.9, top_p=0.9, seed=3, max_tokens=30, ignore_eos=True, logprobs=1)] * 3
    alone = llm.generate(prompts, free, use_tqdm=False)
    mixed_prompts = prompts + _prompts(6, seed=52)
    mixed_params = free + [SamplingParams(temperature=t, seed=i, max_tokens=MAX, structured_outputs=JSON)
                           for i, t in enumerate([0, 1, 0, 1, 0, 1])]
    mixed = llm.generate(mixed_prompts, mixed_params, use_tqdm=False)
    # NOTE: not bit for bit. A step of 12 rows runs the linear layers' matmuls at other row counts
    # than a step of 6, and fp32 GEMMs round by their blocking: on a Zen 4 (2026-11-27) logprobs
    # differed in the 7th digit (-3.9879367 vs -3.9879360). A grammar mask leaking into a free
    # row would change its logprobs by far more than 1e-4 (renormalized or -inf).
    for a, b in zip(alone, mixed[:6]):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert len(la) == len(lb) and all(x.keys() == y.keys() for x, y in zip(la, lb))
        for x, y in zip(la, lb):
            for tok in x:
                assert abs(x[tok] - y[tok]) < 1e-4, (tok, x[tok], y[tok])


def test_logprobs_are_over_the_allowed_tokens(llm):
    so = StructuredOutputsParams(choice=["yes", "no"])
    c = llm.generate([[5, 6, 7]], SamplingParams(temperature=1.0, seed=0, max_tokens=10, logprobs=5,
                                                 structured_outputs=so), use_tqdm=False)[0].outputs[0]
    first = c.logprobs[0]
    finite = {t: lp for t, lp in first.items() if lp > -math.inf}
    tok = llm.engine.tokenize
    assert set(finite) == {tok("y", add_special_tokens=False)[0], tok("n", add_special_tokens=False)[0]}
    assert math.isclose(sum(math.exp(v) for v in finite.values()), 1.0, rel_tol=1e-5)


def test_grammar_compiled_once_per_spec(model_dir):
    llm = LLM(model=model_dir[0], dtype="float32", kv_cache_memory=1 << 24, max_model_len=512)
    same = [SamplingParams(temperature=0, max_tokens=MAX, structured_outputs=JSON),
            SamplingParams(temperature=1, seed=1, max_tokens=MAX, structured_outputs={"json": json.dumps(SCHEMA)}),
            SamplingParams(n=2, temperature=1, seed=2, max_tokens=MAX, structured_outputs={"json": SCHEMA})]
    llm.generate(_prompts(3), same, use_tqdm=False)
    assert llm.engine.structured.num_compiled == 1
    llm.generate(_prompts(1), SamplingParams(max_tokens=20, structured_outputs={"regex": "[0-9]+"}), use_tqdm=False)
    assert llm.engine.structured.num_compiled == 2


def test_bad_specs_fail_before_generation(llm):
    for bad in ({"json": {"type": "objectx"}}, {"regex": "(unclosed"}, {"choice": []}):
        with pytest.raises(ValueError, match="StructuredOutputsParams"):
            llm.generate(_prompts(2), SamplingParams(structured_outputs=bad), use_tqdm=False)
    _done(llm)


def test_matcher_follows_the_kept_tokens(llm):
    """Rollback and rebuild: a matcher synced to fewer (or more) output tokens
    masks exactly as a fresh one fed those tokens."""
    st = llm.engine.structured
    params = SamplingParams(structured_outputs=JSON)
    text = json.dumps({"name": "ab", "age": 3, "score": 1.5, "kind": "dog", "tags": [],
                       "owner": {"id": 1, "home": {"lat": 2, "ok": True}}}, separators=(",", ":"))
    ids = llm.engine.tokenize(text, add_special_tokens=False)
    g = st.start(params)
    for t in ids[:30]:
        assert g.advance(t, None) is None
    for keep in (12, 25, 0, 30):
        g.sync(ids[:keep])
        fresh = st.start(params)
        fresh.sync(ids[:keep])
        a, b = torch.zeros(2, 260), torch.zeros(2, 260)
        st.apply_masks_(a, [(1, g)])
        st.apply_masks_(b, [(1, fresh)])
        assert torch.equal(a, b) and torch.isinf(a[1]).any() and not torch.isinf(a[0]).any()
        assert not torch.isinf(a[1, ids[keep]])  # the next kept token is allowed
        assert torch.isinf(a[1, 257:]).all()  # padded columns never
