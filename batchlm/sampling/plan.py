"""Sort a step's rows by the work they need, in one Python pass.

`StepPlan.build(rows)` returns row indices per kind of work, so the sampler
runs each stage only on the rows that need it and can skip everything for an
all-greedy batch. Knows nothing about tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

from batchlm.sampling.types import SamplingRow


def suppressed_ids(row: SamplingRow) -> list[int]:
    """Token ids that must not be sampled yet because min_tokens isn't reached."""
    p = row.params
    if len(row.output_token_ids) >= p.min_tokens:
        return []
    ids = set(p.stop_token_ids)
    if not p.ignore_eos:
        ids |= row.eos_token_ids
    return sorted(ids)


def has_penalty(row: SamplingRow) -> bool:
    p = row.params
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0


def has_filter(row: SamplingRow) -> bool:
    """True if the row needs top-k or top-p (min-p is handled separately)."""
    p = row.params
    return p.top_k > 0 or p.top_p < 1.0


@dataclass(frozen=True)
class StepPlan:
    greedy_rows: list[int]
    sample_rows: list[int]  # complement of greedy_rows
    penalty_rows: list[int]
    min_tokens_rows: list[int]  # rows with something to suppress this step
    logprob_rows: list[int]
    draft_rows: list[int]  # sampling (not greedy) rows verifying a proposed token

    @staticmethod
    def build(rows: list[SamplingRow]) -> "StepPlan":
        greedy, sample, penalty, min_tok, logprob, draft = [], [], [], [], [], []
        for i, row in enumerate(rows):
            p = row.params
            (greedy if p.greedy else sample).append(i)
            if row.draft_token_id is not None and not p.greedy:
                draft.append(i)
            if has_penalty(row):
                penalty.append(i)
            if p.min_tokens and suppressed_ids(row):
                min_tok.append(i)
            if p.logprobs is not None:
                logprob.append(i)
        return StepPlan(greedy, sample, penalty, min_tok, logprob, draft)

    @property
    def pure_argmax(self) -> bool:
        """Every row greedy, nothing to adjust or report: one argmax does it."""
        return not (self.sample_rows or self.penalty_rows or self.min_tokens_rows or self.logprob_rows)
