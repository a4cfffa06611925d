"""Block manager: plain Python, no torch."""
from __future__ import annotations

import subprocess
import sys

from batchlm.engine.block_manager import BlockManager
from batchlm.engine.sequence import Sequence
from batchlm.sampling_params import SamplingParams


def _seq(ids, i=0):
    return Sequence(i, f"r{i}", 0, list(ids), SamplingParams(), i)


def test_scheduler_and_block_manager_do_not_import_torch():
    code = ("import sys; import batchlm.engine.scheduler, batchlm.engine.block_manager; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _seq(range(10), 0), _seq(range(3), 1)
    assert bm.allocate(a, 10) and a.block_table and len(a.block_table) == 3
    assert bm.allocate(b, 3) and len(b.block_table) == 1
    assert bm.num_free_blocks == 4
    assert not bm.allocate(b, 4 * 6)  # would need 5 more, only 4 free
    assert len(b.block_table) == 1 and bm.num_free_blocks == 4  # unchanged on failure
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert all(blk.ref_count == 0 for blk in bm.blocks)


def test_prefix_hits_share_blocks_and_respect_the_limit():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _seq(list(range(12)) + [99], 0)
    bm.allocate(a, a.num_tokens)
    bm.cache_full_blocks(a, a.num_tokens)  # 3 full blocks cached
    b = _seq(list(range(12)) + [7, 8], 1)
    hit = bm.find_cached_prefix(b.token_ids, b.num_tokens - 1)
    assert hit == a.block_table[:3]
    assert bm.find_cached_prefix(b.token_ids, 11) == a.block_table[:2]  # the limit caps it
    bm.allocate(b, b.num_tokens, hit)
    assert b.block_table[:3] == a.block_table[:3]
    assert all(bm.blocks[x].ref_count == 2 for x in hit)
    # a different token inside the 2nd block breaks the chain there
    c = _seq([0, 1, 2, 3, 4, 5, 0, 7, 8, 9, 10, 11, 12], 2)
    assert bm.find_cached_prefix(c.token_ids, 12) == a.block_table[:1]


def test_freed_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4], 0)
    bm.allocate(a, 4)
    bm.cache_full_blocks(a, 4)
    first, second = a.block_table
    bm.free(a)  # tail first: `second` is now older in the free list than `first`
    assert bm.num_free_blocks == 4
    b = _seq([1, 2, 3, 4, 5], 1)
    hit = bm.find_cached_prefix(b.token_ids, 4)
    assert hit == [first, second]
    assert bm.allocate(b, 5, hit)
    assert bm.num_free_blocks == 1 and b.block_table[:2] == [first, second]
    bm.free(b)
    # Fill the pool with unrelated tokens: the cached blocks get reused, and
    # their hashes with them.
    c = _seq(list(range(100, 108)), 2)
    assert bm.allocate(c, 8)
    assert bm.find_cached_prefix([1, 2, 3, 4], 4) == []


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = _seq([1, 2, 3, 4], 0)
    bm.allocate(a, 4)
    bm.cache_full_blocks(a, 4)
    assert bm.find_cached_prefix([1, 2, 3, 4, 5], 4) == []


def test_trim_gives_back_trailing_blocks_tail_first():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = _seq(range(10), 0)
    assert bm.allocate(a, 14)  # 4 blocks
    head = list(a.block_table)
    bm.trim(a, 5)  # 5 tokens need 2 blocks
    assert a.block_table == head[:2] and bm.num_free_blocks == 6
    bm.trim(a, 8)  # never grows
    assert a.block_table == head[:2]
    bm.free(a)
    assert bm.num_free_blocks == 8
