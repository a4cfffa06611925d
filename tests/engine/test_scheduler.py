"""Scheduler on fake sequences: token budget, chunked prefill, preemption,
max_num_seqs. Plain Python: the model step is simulated by advancing the
counters and appending a dummy token."""
from __future__ import annotations

from batchlm.engine.block_manager import BlockManager
from batchlm.engine.scheduler import Scheduler
from batchlm.engine.sequence import Sequence, SeqStatus
from batchlm.sampling_params import SamplingParams


def _make(num_blocks=64, block_size=4, max_seqs=8, budget=16, chunked=True):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_seqs, budget, chunked), bm


def _add(s, n_prompt, i):
    seq = Sequence(i, f"r{i}", 0, list(range(i * 1000, i * 1000 + n_prompt)), SamplingParams(), i)
    seq.logits_from = n_prompt - 1
    s.add(seq)
    return seq


def _simulate(s, out, max_out=3):
    """Advance as the engine would; finish sequences after max_out tokens."""
    s.update_after_step(out)
    for seq, _ in out.scheduled:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.append_token(7)
            if seq.num_output_tokens >= max_out:
                s.finish(seq, "length")


def test_budget_splits_long_prompts_into_chunks():
    s, _ = _make(budget=10)
    a = _add(s, 25, 0)
    chunks = []
    while a.num_output_tokens == 0:
        out = s.schedule()
        chunks.append(out.num_tokens)
        _simulate(s, out)
    assert chunks == [10, 10, 5]


def test_decodes_and_prefill_chunks_share_a_step():
    s, _ = _make(budget=8)
    a = _add(s, 3, 0)
    _simulate(s, s.schedule())  # a prefilled, has 1 output token
    b = _add(s, 20, 1)
    out = s.schedule()
    assert [(q.seq_id, n) for q, n in out.scheduled] == [(a.seq_id, 1), (b.seq_id, 7)]


def test_no_chunking_waits_for_a_full_budget():
    s, _ = _make(budget=10, chunked=False)
    _add(s, 25, 0)
    assert not s.schedule()


def test_max_num_seqs_caps_running():
    s, _ = _make(max_seqs=2, budget=100)
    for i in range(4):
        _add(s, 4, i)
    out = s.schedule()
    assert len(out.scheduled) == 2 and len(s.running) == 2 and len(s.waiting) == 2


def test_preemption_newest_first_loses_nothing():
    # 6 blocks of 4 tokens; three sequences of 7 prompt tokens each growing.
    s, bm = _make(num_blocks=6, block_size=4, budget=64)
    seqs = [_add(s, 7, i) for i in range(3)]
    preempted = []
    steps = 0
    while s.has_unfinished():
        out = s.schedule()
        preempted += [p.seq_id for p in out.preempted]
        _simulate(s, out, max_out=6)
        steps += 1
        assert steps < 200
    assert preempted and preempted[0] == 2  # the newest went first
    assert all(q.status is SeqStatus.FINISHED and q.num_output_tokens == 6 for q in seqs)
    assert all(q.output_token_ids == [7] * 6 for q in seqs)
    assert bm.num_free_blocks == 6


def test_waiting_twin_is_held_until_the_lead_has_its_prompt():
    s, _ = _make(budget=100)
    lead = _add(s, 9, 0)
    twin = _add(s, 9, 1)
    twin.token_ids = twin.prompt_token_ids = list(lead.prompt_token_ids)
    twin.wait_for = lead
    out = s.schedule()
    assert [q for q, _ in out.scheduled] == [lead]
    _simulate(s, out)
    out = s.schedule()
    # lead decodes; the twin starts with its 2 full blocks from the cache
    assert [(q, n) for q, n in out.scheduled] == [(lead, 1), (twin, 1)]
    assert twin.num_cached_tokens == 8
