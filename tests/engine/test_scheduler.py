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


# ---- speculative decoding ----------------------------------------------------------


def _verify(s, out, accept: dict, correction=99):
    """Advance as the engine does after verification: a speculating sequence
    keeps accept[seq] of its proposals plus one token of its own."""
    speculating = [q for q, _ in out.scheduled if q.spec_token_ids]
    s.update_after_step(out)  # advances the others only
    for q in speculating:
        for t in q.spec_token_ids[:accept[q]]:
            q.append_token(t)
        q.append_token(correction)
        s.accept_speculation(q)


def test_a_speculating_decode_is_budgeted_k_plus_one_and_keeps_what_is_accepted():
    s, bm = _make(block_size=4, budget=64)
    a = _add(s, 3, 0)
    _simulate(s, s.schedule())  # prompt computed, one output token: a decode
    a.spec_token_ids = [5, 6, 7]
    out = s.schedule()
    assert out.scheduled == [(a, 4)] and len(a.block_table) == 2  # positions 3..6
    _verify(s, out, {a: 2})
    assert a.output_token_ids == [7, 5, 6, 99]
    assert a.num_computed_tokens == a.num_tokens - 1 == 6 and a.spec_token_ids == []
    out = s.schedule()  # a plain decode again
    assert out.scheduled == [(a, 1)]


def test_speculation_leaves_one_token_of_budget_to_each_later_sequence():
    s, _ = _make(block_size=4, budget=5)
    a, b, c = (_add(s, 2, i) for i in range(3))
    _simulate(s, s.schedule())  # 2 + 2 + 1 of the three prompts
    _simulate(s, s.schedule())
    assert all(q.num_tokens - q.num_computed_tokens == 1 for q in (a, b))
    a.spec_token_ids = [1, 2, 3, 4, 5, 6]
    out = s.schedule()
    by_seq = {q.seq_id: n for q, n in out.scheduled}
    assert a.spec_token_ids == [1, 2]  # 5 - 1 for a - 1 each for b and c
    assert by_seq[a.seq_id] == 1 + len(a.spec_token_ids) and sum(by_seq.values()) <= 5
    assert all(n >= 1 for n in by_seq.values()) and len(by_seq) == len(s.running)


def test_only_a_decode_speculates_and_speculation_never_preempts():
    s, bm = _make(num_blocks=3, block_size=4, budget=64)
    a = _add(s, 2, 0)
    a.spec_token_ids = [1, 2]  # still a prompt: dropped
    out = s.schedule()
    assert out.scheduled == [(a, 2)] and a.spec_token_ids == []
    _simulate(s, out)
    b = _add(s, 6, 1)
    _simulate(s, s.schedule())  # b's prompt: 2 blocks; a holds 1, none free
    assert bm.num_free_blocks == 0
    a.spec_token_ids = [1, 2, 3]  # its next token fits its block; the proposals would need another
    out = s.schedule()
    assert not out.preempted and (a, 1) in out.scheduled and a.spec_token_ids == []


def test_rejected_tokens_are_never_published_and_their_blocks_come_back():
    s, bm = _make(num_blocks=8, block_size=4, budget=64)
    a = _add(s, 3, 0)
    _simulate(s, s.schedule())  # 3 prompt tokens + 1 output
    true_head = list(a.token_ids)  # 4 tokens: the first block once computed
    drafts = [11, 12, 13, 14, 15]
    a.spec_token_ids = list(drafts)
    out = s.schedule()
    assert out.scheduled == [(a, 6)] and len(a.block_table) == 3  # positions 3..8
    free_before = bm.num_free_blocks
    _verify(s, out, {a: 0}, correction=42)  # every proposal rejected
    assert a.token_ids == true_head + [42] and a.num_computed_tokens == 4
    assert len(a.block_table) == 2 and bm.num_free_blocks == free_before + 1
    # The full first block is published; nothing holding a rejected token is.
    assert bm.find_cached_prefix(true_head + drafts[:4], 8) == a.block_table[:1]
    assert all(bm.blocks[b].hash is None for b in a.block_table[1:])
    s.finish(a, "length")
    assert bm.num_free_blocks == 8


def test_preempting_a_speculating_sequence_drops_its_proposals():
    s, bm = _make(num_blocks=6, block_size=4, budget=64)
    seqs = [_add(s, 7, i) for i in range(3)]
    steps = 0
    while s.has_unfinished():
        for q in s.running:  # every decode proposes two tokens each step
            if q.num_tokens - q.num_computed_tokens == 1:
                q.spec_token_ids = [7, 7]
                q.draft_computed_tokens = q.num_tokens + 1  # as a draft model leaves it
        out = s.schedule()
        assert all(not p.spec_token_ids and p.draft_computed_tokens == 0 for p in out.preempted)
        _verify(s, out, {q: 1 for q, _ in out.scheduled}, correction=7)
        for q, _ in out.scheduled:
            if q.num_computed_tokens >= q.num_prompt_tokens and q.num_tokens == q.num_computed_tokens:
                q.append_token(7)  # a prompt just finished: its first token
            if q.num_output_tokens >= 6 and not q.is_finished:
                s.finish(q, "length")
        steps += 1
        assert steps < 200
    assert s.num_preemptions > 0
    assert all(q.output_token_ids[:6] == [7] * 6 for q in seqs)
    assert bm.num_free_blocks == 6
