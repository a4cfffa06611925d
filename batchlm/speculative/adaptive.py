"""How many tokens a sequence proposes next: adapted to its own acceptance (plain Python).

Contract: `next_length(current, proposed, accepted, k_max) -> int`, applied
after each verification of a sequence (Sequence.spec_k holds the result):
every proposal accepted -> one more next time (up to k_max); otherwise the
accepted count + 1 (at least 1). A sequence whose proposals keep failing
thus verifies one token a step, the cheapest check that still notices when
its text starts copying again, and one that keeps accepting grows back to
k_max. The batch-size rule (SpeculativeConfig.disable_by_batch_size) decides
separately whether a step speculates at all.

Any length chosen before a verification keeps greedy output exact and
sampled output distributed as the target's (each verification is exact
for the proposals it is given), so the rule changes speed only.
"""
from __future__ import annotations


def next_length(current: int, proposed: int, accepted: int, k_max: int) -> int:
    if proposed <= 0:
        return current
    if accepted >= proposed:
        return min(k_max, max(current, proposed) + 1)
    return max(1, min(k_max, accepted + 1))
