"""The plain-Python half of CUDA graphs for decode steps: which batch sizes
get a graph, which graph a step replays, and the padded inputs it is given.

Contract
--------
- `capture_sizes(max_num_seqs) -> (1, 2, 4, ..., max_num_seqs)`: the
  powers of two below max_num_seqs, then max_num_seqs itself (one graph per
  size; a step of n decodes replays the smallest size >= n).
- `bucket_for(n, sizes) -> size | None`: that size, or None when n is larger
  than every size (the step then runs eagerly).
- `pad_decode(rows, bucket, dummy_block, block_size) -> DecodeInputs`: the
  step's decode rows (token, position, slot, seq_len, block table), padded to
  `bucket` rows. A padding row decodes token 0 at position 0 into slot 0 of
  `dummy_block`, a cache block the block manager never hands out, with a
  context of that one token: it writes only there and reads only what it
  wrote, so real sequences never see it. Its outputs are never read. (No
  rows at all: every row padding, as the graphs are captured.)
- `StaticLayout(max_batch, width)`: where each input lives in the one int64
  buffer the graphs read (pinned on the host, one copy to the device).

No torch here (tests/engine/test_graph_plan.py checks): the capture and the
replay are batchlm.engine.cuda_graphs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


def capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    sizes = []
    b = 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    sizes.append(max_num_seqs)
    return tuple(sizes)


def bucket_for(n: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size >= n (sizes ascending), or None."""
    for size in sizes:
        if size >= n:
            return size
    return None


class DecodeRow(NamedTuple):
    """One decoding sequence of the step."""

    token: int
    position: int
    slot: int  # cache slot its key/value is written to
    seq_len: int  # tokens in the cache after the step (position + 1)
    block_table: list[int]


class DecodeInputs(NamedTuple):
    """The graph's inputs, each `bucket` long (tables: `bucket` rows, unpadded)."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    seq_lens: list[int]
    tables: list[list[int]]


def pad_decode(rows: list[DecodeRow], bucket: int, dummy_block: int, block_size: int) -> DecodeInputs:
    if len(rows) > bucket:
        raise ValueError(f"{len(rows)} decode rows do not fit a graph of batch size {bucket}")
    pad = bucket - len(rows)
    return DecodeInputs(
        ids=[r.token for r in rows] + [0] * pad,
        positions=[r.position for r in rows] + [0] * pad,
        slots=[r.slot for r in rows] + [dummy_block * block_size] * pad,
        seq_lens=[r.seq_len for r in rows] + [1] * pad,
        tables=[r.block_table for r in rows] + [[dummy_block]] * pad,
    )


@dataclass(frozen=True)
class StaticLayout:
    """Offsets in the flat int64 input buffer of graphs up to `max_batch`
    sequences of up to `width` blocks: ids, positions, slots, seq_lens
    (max_batch each), then the block tables [max_batch, width] row-major.
    The graph of batch size b reads the first b entries of each."""

    max_batch: int
    width: int

    @property
    def ids(self) -> int:
        return 0

    @property
    def positions(self) -> int:
        return self.max_batch

    @property
    def slots(self) -> int:
        return 2 * self.max_batch

    @property
    def seq_lens(self) -> int:
        return 3 * self.max_batch

    @property
    def tables(self) -> int:
        return 4 * self.max_batch

    @property
    def size(self) -> int:
        return self.max_batch * (4 + self.width)

    def fill(self, buf, inputs: DecodeInputs) -> None:
        """Write `inputs` into `buf` (any indexable int buffer of `size`, e.g.
        a numpy view of pinned memory). Entries past the bucket, and table
        entries past a row's length, keep stale values: never read (a decode
        reads the blocks of its own context only)."""
        b = len(inputs.ids)
        if b > self.max_batch:
            raise ValueError(f"batch {b} is larger than the layout's {self.max_batch}")
        for off, values in ((self.ids, inputs.ids), (self.positions, inputs.positions),
                            (self.slots, inputs.slots), (self.seq_lens, inputs.seq_lens)):
            buf[off:off + b] = values
        for i, table in enumerate(inputs.tables):
            if len(table) > self.width:
                raise ValueError(f"a block table of {len(table)} blocks is wider than the graphs' {self.width}")
            start = self.tables + i * self.width
            buf[start:start + len(table)] = table
