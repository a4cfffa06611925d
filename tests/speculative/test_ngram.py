"""N-gram proposer: plain Python, tested alone."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from batchlm.speculative import NgramProposer


def _reference(ids, k, lo, hi, limit=None):
    """The rule written the slow, obvious way."""
    k = k if limit is None else min(k, limit)
    if k <= 0:
        return []
    for n in range(min(hi, len(ids) - 1), lo - 1, -1):
        suffix = ids[len(ids) - n:]
        for i in range(len(ids) - n - 1, -1, -1):  # most recent first; a token must follow
            if ids[i:i + n] == suffix:
                return ids[i + n:i + n + k]
    return []


def test_longest_suffix_first_then_most_recent_match():
    p = NgramProposer(3, 1, 3)
    #        0  1  2  3  4  5  6  7  8  9
    ids = [1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] (n=3) occurs at 0: continue with 9, 9, 2
    assert p.propose(ids) == [9, 9, 2]
    # n=3 suffix [5, 2, 3] has no match, so n=2 [2, 3]: most recent earlier match at 5 -> 7, 8, 1
    assert p.propose([1, 2, 3, 9, 9, 2, 3, 7, 8, 1, 5, 2, 3]) == [7, 8, 1]
    assert p.propose([4, 5, 6]) == []  # nothing repeats
    assert p.propose([4]) == []


def test_limits_and_short_continuations():
    p = NgramProposer(5, 1, 2)
    ids = [1, 2, 3, 4, 1, 2]
    assert p.propose(ids) == [3, 4, 1, 2]  # only four tokens follow the match
    assert p.propose(ids, limit=2) == [3, 4]
    assert p.propose(ids, limit=0) == []
    assert NgramProposer(2, 2, 2).propose([7, 7, 7]) == [7]  # overlapping match: [7, 7] at 0, then 7


def test_large_ids_do_not_match_across_token_boundaries():
    # 256 then 0 hold the bytes of the id 1 one byte off a token boundary: not a match
    assert NgramProposer(2, 1, 1).propose([5, 256, 0, 7, 1]) == [] == _reference([5, 256, 0, 7, 1], 2, 1, 1)
    # a real, earlier match is still found behind the more recent false one
    assert NgramProposer(2, 1, 1).propose([1, 9, 256, 0, 7, 1]) == [9, 256]


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_obvious_rule_on_random_histories(seed):
    rng = random.Random(seed)
    for _ in range(300):
        ids = [rng.randrange(rng.choice([3, 10, 50000])) for _ in range(rng.randrange(1, 60))]
        lo = rng.randrange(1, 4)
        hi = lo + rng.randrange(0, 3)
        k = rng.randrange(1, 6)
        limit = rng.choice([None, 0, 1, 3])
        assert NgramProposer(k, lo, hi).propose(ids, limit) == _reference(ids, k, lo, hi, limit), (ids, lo, hi, k)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        NgramProposer(2, 3, 2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        NgramProposer(0, 1, 2)


def test_speculative_config_and_proposer_do_not_import_torch():
    code = ("import sys; import batchlm.speculative, batchlm.config; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
