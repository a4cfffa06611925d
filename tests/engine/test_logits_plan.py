"""LogitsPlan: which logits rows belong to which sequence, and why (plain Python)."""
from __future__ import annotations

from batchlm.engine.logits_plan import LogitsPlan, PromptRows, SampleRows
from batchlm.engine.model_runner import LayoutEntry
from batchlm.engine.sequence import Sequence
from batchlm.sampling_params import SamplingParams


def _seq(i, n_prompt, n_out=0, computed=0, logits_from=None, score_only=False):
    s = Sequence(i, f"r{i}", 0, list(range(n_prompt)), SamplingParams(), i)
    s.token_ids += [9] * n_out
    s.num_computed_tokens = computed
    s.logits_from = n_prompt - 1 if logits_from is None else logits_from
    s.score_only = score_only
    return s


def test_decode_speculation_prompt_end_and_prompt_logprobs():
    dec = _seq(0, 5, n_out=2, computed=6)  # a plain decode: 1 token at row 0
    spec = _seq(1, 4, n_out=1, computed=4)  # decode with 3 proposals: rows 1..4
    spec.spec_token_ids = [7, 8, 9]
    chunk = _seq(2, 30, computed=0)  # a prompt chunk of 10: not done, no sample
    end = _seq(3, 12, computed=4, logits_from=0)  # prompt end with prompt logprobs from 0
    layout = [LayoutEntry(dec, 1, 0), LayoutEntry(spec, 4, 1), LayoutEntry(chunk, 10, 5),
              LayoutEntry(end, 8, 15)]
    plan = LogitsPlan.build(layout)
    assert plan.samples == [SampleRows(dec, 0), SampleRows(spec, 1, (7, 8, 9)), SampleRows(end, 5)]
    assert plan.num_sample_rows == 6
    # prompt positions 4..10 of `end` (11 predicts nothing in the prompt)
    assert plan.prompts == [PromptRows(end, 6, 4, 11)]
    assert plan.hidden_rows == [0, 1, 2, 3, 4, 22] + list(range(15, 22))


def test_score_only_sequences_never_sample():
    s = _seq(0, 6, computed=0, logits_from=3, score_only=True)
    plan = LogitsPlan.build([LayoutEntry(s, 6, 0)])
    assert plan.samples == [] and plan.prompts == [PromptRows(s, 0, 3, 5)]
    assert plan.hidden_rows == [3, 4]


def test_logits_plan_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import batchlm.engine.logits_plan; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
