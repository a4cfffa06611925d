"""The plain-Python half of the decode CUDA graphs (batchlm.engine.graph_plan):
buckets, padding rows, the static buffer layout. No torch."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest

from batchlm.engine.graph_plan import DecodeRow, StaticLayout, bucket_for, capture_sizes, pad_decode


def test_graph_plan_does_not_import_torch():
    code = ("import sys; import batchlm.engine.graph_plan; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("max_num_seqs, want", [
    (1, (1,)), (2, (1, 2)), (8, (1, 2, 4, 8)), (128, (1, 2, 4, 8, 16, 32, 64, 128)),
    (48, (1, 2, 4, 8, 16, 32, 48)), (3, (1, 2, 3)),
])
def test_capture_sizes(max_num_seqs, want):
    assert capture_sizes(max_num_seqs) == want


def test_capture_sizes_refuses_nothing_to_capture():
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)


def test_bucket_is_the_smallest_size_that_fits():
    sizes = capture_sizes(48)
    for n in range(1, 49):
        b = bucket_for(n, sizes)
        assert b >= n and all(s < n for s in sizes if s < b), (n, b)
    assert bucket_for(49, sizes) is None  # larger than every graph: eager


def rows(n, bs=16, rnd=None):
    rnd = rnd or random.Random(random.SystemRandom().randrange(1 << 30))
    out = []
    for i in range(n):
        pos = rnd.randrange(0, 200)
        table = [rnd.randrange(1, 1000) for _ in range(pos // bs + 1)]
        out.append(DecodeRow(rnd.randrange(256), pos, table[pos // bs] * bs + pos % bs, pos + 1, table))
    return out


def test_padding_rows_touch_only_the_dummy_block():
    real = rows(3)
    got = pad_decode(real, 8, dummy_block=999, block_size=16)
    assert all(len(x) == 8 for x in got)
    assert got.ids[:3] == [r.token for r in real] and got.slots[:3] == [r.slot for r in real]
    assert got.seq_lens[:3] == [r.seq_len for r in real] and got.tables[:3] == [r.block_table for r in real]
    # a padding row: token 0 at position 0, written into the dummy block's first slot, sees only it
    assert got.ids[3:] == [0] * 5 and got.positions[3:] == [0] * 5
    assert got.slots[3:] == [999 * 16] * 5 and got.seq_lens[3:] == [1] * 5
    assert got.tables[3:] == [[999]] * 5
    assert pad_decode([], 2, 7, 16).slots == [7 * 16] * 2  # capture: every row padding
    with pytest.raises(ValueError, match="batch size 2"):
        pad_decode(real, 2, 999, 16)


def test_layout_fill_writes_each_input_where_the_graph_reads_it():
    lay = StaticLayout(max_batch=8, width=16)
    assert lay.size == 8 * (4 + 16)
    buf = [-1] * lay.size
    real = rows(5)
    inputs = pad_decode(real, 8, dummy_block=500, block_size=16)
    lay.fill(buf, inputs)
    M, W = lay.max_batch, lay.width
    assert buf[lay.ids:lay.ids + 8] == inputs.ids
    assert buf[lay.positions:lay.positions + 8] == inputs.positions
    assert buf[lay.slots:lay.slots + 8] == inputs.slots
    assert buf[lay.seq_lens:lay.seq_lens + 8] == inputs.seq_lens
    for i, table in enumerate(inputs.tables):
        start = lay.tables + i * W
        assert buf[start:start + len(table)] == table
    assert lay.tables == 4 * M
    # a smaller bucket later: its rows overwrite the first entries only
    lay.fill(buf, pad_decode(real[:1], 1, 500, 16))
    assert buf[lay.ids] == real[0].token and buf[lay.ids + 1] == inputs.ids[1]


def test_layout_refuses_what_does_not_fit():
    lay = StaticLayout(max_batch=2, width=2)
    with pytest.raises(ValueError, match="larger than the layout"):
        lay.fill([0] * lay.size, pad_decode(rows(3), 4, 9, 16))
    wide = DecodeRow(1, 40, 2 * 16 + 8, 41, [0, 1, 2])
    with pytest.raises(ValueError, match="wider than the graphs' 2"):
        lay.fill([0] * lay.size, pad_decode([wide], 2, 9, 16))
