"""Scheduler: which sequences run this step, and how many tokens each.

Plain Python, no torch. There is no prefill or decode phase: each sequence
has `num_computed_tokens` and `num_tokens`, and each step hands out a token
budget (`max_num_batched_tokens`). That covers chunked prefill (a long prompt
takes several steps), prefix caching (cached tokens count as computed) and speculative decoding
(a decode holding k proposed tokens is scheduled for 1 + k; the engine
verifies them and calls `accept_speculation`, which keeps the accepted ones,
gives back the blocks of rejected slots and publishes only full blocks of
accepted tokens).

Order of a step:
1. Running sequences, oldest first, each gets what it still needs (one token
   for a decode, the rest of its prompt, capped by the budget). When blocks run
   out, the newest running sequence is preempted (blocks freed, computed
   tokens reset: it is recomputed later, prompt and generated tokens alike,
   so nothing is lost and greedy output is unchanged).
2. Waiting sequences, first come first served, while budget, `max_num_seqs`
   and blocks last (none are admitted in a step that preempted).

The output is a plain list of (sequence, num_tokens); the model runner turns
it into tensors.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchlm.engine.block_manager import BlockManager
from batchlm.engine.sequence import Sequence, SeqStatus


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, enable_chunked_prefill: bool = True):
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total, for tests and reporting

    # ---- bookkeeping -----------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, seq: Sequence, reason: str, stop_reason=None) -> None:
        """Mark `seq` finished and give its blocks back (idempotent)."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.spec_token_ids = []
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.bm.free(seq)

    # ---- the step ----------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """One step's work: the running sequences first (a sequence short of
        blocks preempts the newest), then, unless that preempted anyone,
        waiting sequences admitted while tokens, seats and blocks last."""
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_num_batched_tokens)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        """Schedule the running sequences' next tokens into `out`; returns the budget left."""
        running = list(self.running)
        for i, seq in enumerate(running):
            if budget <= 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted below, this step
                continue
            need = seq.num_tokens - seq.num_computed_tokens
            n = min(need, budget)
            if n <= 0:
                continue
            if seq.spec_token_ids:
                # Each later running sequence keeps at least one token of the budget.
                n += self._fit_speculation(seq, need, budget - n - (len(running) - i - 1))
            while not self.bm.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                continue
            out.scheduled.append((seq, n))
            budget -= n
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """Move waiting sequences to running, in order, with their first chunk
        scheduled into `out` (after any cached prefix), while `budget`, seats
        and free blocks last. A sequence whose twin is still computing the
        shared prompt waits behind it, keeping its place."""
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.wait_for is not None:
                if seq.wait_for.is_finished or seq.wait_for.prompt_done:
                    seq.wait_for = None
                else:  # let its twin fill the prefix cache first
                    skipped.append(self.waiting.popleft())
                    continue
            cached: list[int] = []
            if seq.num_computed_tokens == 0 and not seq.block_table:
                # Logits are needed from position `logits_from` on, so that
                # token must be computed in this run; so must the last token.
                limit = min(seq.logits_from, seq.num_tokens - 1)
                cached = self.bm.find_cached_prefix(seq.token_ids, limit)
            computed = len(cached) * self.bm.block_size if cached else seq.num_computed_tokens
            n = min(seq.num_tokens - computed, budget)
            if n < seq.num_tokens - computed and not self.enable_chunked_prefill:
                break
            if not self.bm.allocate(seq, computed + n, cached):
                if not self.running and not out.scheduled:
                    raise RuntimeError(
                        f"request {seq.request_id!r} needs {self.bm.blocks_needed(computed + n)} KV blocks "
                        f"but the cache has only {self.bm.num_free_blocks} free of {self.bm.num_blocks}")
                break
            self.waiting.popleft()
            self._start(seq, computed if cached else None)
            out.scheduled.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _start(self, seq: Sequence, cached_tokens: int | None) -> None:
        """`seq` runs from now on; `cached_tokens`: how many of its tokens the
        prefix cache served (None: no hit), counted in the hit rate."""
        seq.spec_token_ids = []  # a sequence speculates only once it decodes
        if cached_tokens is not None:
            seq.num_computed_tokens = cached_tokens
            seq.num_cached_tokens = max(seq.num_cached_tokens, cached_tokens)
            self.bm.query_tokens += seq.num_prompt_tokens
            self.bm.hit_tokens += cached_tokens
        elif seq.num_computed_tokens == 0:
            self.bm.query_tokens += seq.num_prompt_tokens
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _fit_speculation(self, seq: Sequence, need: int, room: int) -> int:
        """How many of `seq`'s speculative tokens to verify this step, on top of
        its `need` tokens: as many as `room` (budget left) and the free blocks
        allow; it never preempts another sequence to verify a guess. Only a
        decode (need == 1) speculates. The tokens that do not fit are dropped
        from seq.spec_token_ids."""
        spec = seq.spec_token_ids
        keep = max(0, min(len(spec), room)) if need == 1 else 0
        if keep and not self.bm.can_allocate(seq, seq.num_computed_tokens + need + keep):
            keep = 0
        del spec[keep:]
        return keep

    def accept_speculation(self, seq: Sequence) -> None:
        """After verification appended the accepted tokens (and one more) to
        `seq`: every token but the last is now computed. Gives back the blocks
        of rejected slots and publishes the full blocks (never a rejected
        token: they hold only accepted, computed tokens)."""
        seq.spec_token_ids = []
        seq.num_computed_tokens = seq.num_tokens - 1
        if seq.status is SeqStatus.RUNNING:
            self.bm.trim(seq, seq.num_tokens)
            self.bm.cache_full_blocks(seq, seq.num_computed_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.spec_token_ids = []
        seq.num_computed_tokens = seq.draft_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance the counters of what ran and publish full blocks to the cache."""
        for seq, n in out.scheduled:
            if seq.spec_token_ids:  # verified first: see accept_speculation
                continue
            seq.num_computed_tokens += n
            self.bm.cache_full_blocks(seq, seq.num_computed_tokens)
