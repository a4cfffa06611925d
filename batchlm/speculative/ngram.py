"""N-gram proposer (prompt lookup): guess the next tokens of a sequence from
its own history.

Contract
--------
`NgramProposer(k, n_min, n_max).propose(token_ids, limit)` looks for the last
n tokens of `token_ids` (prompt + generated so far), n from n_max down to
n_min, earlier in `token_ids`; at the first n with a match it returns the
tokens that followed the most recent earlier occurrence, at most
min(k, limit) of them (fewer when that occurrence is near the end). No match,
or limit <= 0: []. Deterministic: the same history gives the same proposal
(rejection sampling relies on this: the proposal distribution is one-hot).

Plain Python, no torch. It knows nothing about sequences, sampling or the
cache. The search is `bytes.rfind` over the ids packed as fixed-width
integers (C speed; a hit that is not aligned to a token boundary is skipped),
so a step costs microseconds per sequence at prompt lengths of a few thousand.
"""
from __future__ import annotations

from array import array


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min ({prompt_lookup_min}) <= "
                             f"prompt_lookup_max ({prompt_lookup_max})")
        if num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        self.k = num_speculative_tokens
        self.n_min = prompt_lookup_min
        self.n_max = prompt_lookup_max

    def propose(self, token_ids: list[int], limit: int | None = None) -> list[int]:
        k = self.k if limit is None else min(self.k, limit)
        length = len(token_ids)
        if k <= 0 or length <= self.n_min:
            return []
        packed = array("q", token_ids)
        w = packed.itemsize
        buf = packed.tobytes()
        for n in range(min(self.n_max, length - 1), self.n_min - 1, -1):
            pattern = buf[(length - n) * w:]
            # NOTE: an occurrence must end by position length - 1, so that at
            # least one token follows it (the suffix itself ends at `length`).
            end = (length - 1) * w
            while True:
                pos = buf.rfind(pattern, 0, end)
                if pos < 0:
                    break
                if pos % w == 0:
                    start = pos // w + n
                    return list(token_ids[start:start + k])
                end = pos + len(pattern) - 1  # look for occurrences starting before `pos`
        return []
