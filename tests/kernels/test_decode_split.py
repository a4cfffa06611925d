"""How the Triton decode splits its contexts (split-K): enough programs to
fill the device, no piece below MIN_SPLIT_BLOCKS, every block covered."""
from __future__ import annotations

import random

from batchlm.kernels import triton_attention as ta


def test_many_sequences_take_one_program_each():
    # the headline case on an H100 (132 SMs): 256 sequences x 1024 tokens, 3 kv heads
    assert ta.decode_split(64, 256, 3, 4 * 132) == (1, 64)


def test_few_sequences_split_to_fill_the_device_down_to_the_least_piece():
    assert ta.decode_split(64, 32, 3, 4 * 132) == (4, 16)  # wants 6, pieces of 16 allow 4
    assert ta.decode_split(256, 32, 3, 4 * 132) == (6, 43)  # 6 fill the device
    assert ta.decode_split(1000, 1, 3, 4 * 132) == (59, 17)  # 62 pieces of >= 16, evened out
    assert ta.decode_split(1, 1, 3, 4 * 132) == (1, 1)
    assert ta.decode_split(64, 8, 3, None) == (4, 16)  # no device to fill: as fine as allowed


def test_every_split_covers_the_blocks_with_no_empty_piece():
    rnd = random.Random(random.SystemRandom().randrange(1 << 30))
    for _ in range(2000):
        most, seqs, kvh = rnd.randrange(1, 5000), rnd.randrange(1, 600), rnd.choice([1, 2, 3, 8])
        target = rnd.choice([None, 4 * 132, 4 * 108, 1])
        least = rnd.choice([ta.MIN_SPLIT_BLOCKS, 1, 8, 64])
        n, size = ta.decode_split(most, seqs, kvh, target, least)
        why = (most, seqs, kvh, target, least, n, size)
        assert n * size >= most and (n - 1) * size < most, why  # covered, the last piece not empty
        assert size >= min(least, most), why
        if target is not None and n > 1:
            assert (n - 1) * seqs * kvh < target, why  # no more pieces than the device needs


def test_attended_blocks_counts_the_window():
    assert ta.attended_blocks([1, 16, 17], 16, None) == 2
    assert ta.attended_blocks([1000], 16, 40) == 3  # positions 960..999: blocks 60, 61, 62
    assert ta.attended_blocks([1000], 32, None) == 32
