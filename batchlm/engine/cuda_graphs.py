"""CUDA graphs of the model's decode step, one per batch-size bucket.

The capture and replay are exercised by the GPU tests
(tests/gpu/test_gpu_engine.py: greedy tokens with graphs on and off
identical at every bucket; passed on an H100, 2026-11-26), which are
skipped without CUDA. What the CPU checks:
`capture=False` runs the very forward that would be captured (static
buffers, padding rows, graph_max_blocks) eagerly at each step, and under
Triton's interpreter gives the same greedy tokens as the plain path
(tests/kernels/interpreter/test_triton_engine.py); the plain-Python half
(buckets, padding, the buffer layout) is batchlm.engine.graph_plan.

Contract
--------
`DecodeGraphs(model, kv_caches, max_num_seqs, width, block_size,
dummy_block, hidden_size, dtype, device)` captures, largest batch first and
sharing one memory pool, `model(ids, positions, kv_caches, meta)` for every
size of graph_plan.capture_sizes(max_num_seqs), each over static inputs:
views of one device int64 buffer laid out by graph_plan.StaticLayout (width
= blocks per sequence at max_model_len). `run(rows) -> hidden [n, hidden]`
pads the step's n decode rows to their bucket, writes them into a pinned
host buffer, copies it to the device in one non-blocking copy and replays.
Padding rows write into `dummy_block` (a cache block kept out of the block
manager) and their outputs are dropped.

Only for steps where every sequence decodes one token (no prefill, no
speculative tokens) and only with an attention backend that takes its launch
shapes from `meta.graph_max_blocks` (TritonPagedAttention: the reference
attention loops over host-side lengths, which a replay would not see).

NOTE: the hidden states returned are a view of the graph's static output:
valid until the next `run`. The engine reads the step's logits before then.
"""
from __future__ import annotations

import torch

from batchlm.engine.graph_plan import DecodeRow, StaticLayout, bucket_for, capture_sizes, pad_decode
from batchlm.kernels.attention import AttentionMetadata


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_num_seqs: int, width: int, block_size: int, dummy_block: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device, capture: bool = True):
        self.model, self.kv_caches = model, kv_caches
        self.capture = capture  # False: no graphs, the static forward runs eagerly (see the NOTE)
        self.sizes = capture_sizes(max_num_seqs)
        self.block_size, self.dummy_block, self.width = block_size, dummy_block, width
        M = self.sizes[-1]
        self.layout = StaticLayout(M, width)
        lay = self.layout
        self.host = torch.zeros(lay.size, dtype=torch.long, pin_memory=capture)
        self._host_np = self.host.numpy()
        self.dev = torch.zeros(lay.size, dtype=torch.long, device=device)
        self.ids = self.dev[lay.ids:lay.ids + M]  # [M]
        self.positions = self.dev[lay.positions:lay.positions + M]  # [M]
        self.slots = self.dev[lay.slots:lay.slots + M]  # [M]
        self.seq_lens = self.dev[lay.seq_lens:lay.seq_lens + M]  # [M]
        self.tables = self.dev[lay.tables:].view(M, width)  # [M, width]
        self.query_start_loc = torch.arange(M + 1, dtype=torch.long, device=device)  # one token each
        self.out = torch.empty(M, hidden_size, dtype=dtype, device=device)  # [M, hidden]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.replays = {b: 0 for b in self.sizes}  # steps run per bucket
        if capture:
            self._capture()

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], block_tables=self.tables[:b], seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[:b + 1], num_decodes=b,
            seq_lens_list=[1] * b, query_lens_list=[1] * b,  # placeholders (see graph_max_blocks)
            block_size=self.block_size, block_tables_list=None, graph_max_blocks=self.width)

    def _stage(self, rows: list[DecodeRow], bucket: int) -> None:
        # NOTE: the pinned buffer is rewritten only after the previous step's
        # sampled ids were read on the host, which waits for its copy.
        self.layout.fill(self._host_np, pad_decode(rows, bucket, self.dummy_block, self.block_size))
        n = self.layout.tables + bucket * self.width  # up to the bucket's last table row
        self.dev[:n].copy_(self.host[:n], non_blocking=True)  # one host-to-device copy (pinned: async)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for b in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool
            self._stage([], b)  # every row padding
            self._forward(b)  # warm-up outside the graph: compiles the Triton kernels, moves lazy tables
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(b)
            pool = graph.pool() if pool is None else pool
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def _forward(self, b: int) -> None:
        """What the graph of batch size b holds: the model over the static inputs into the static output."""
        self.out[:b] = self.model(self.ids[:b], self.positions[:b], self.kv_caches, self._meta(b))

    def fits(self, n: int) -> bool:
        return bucket_for(n, self.sizes) is not None

    def run(self, rows: list[DecodeRow]) -> torch.Tensor:
        """Hidden states [len(rows), hidden] of one decode step (see the NOTE above)."""
        b = bucket_for(len(rows), self.sizes)
        if b is None:
            raise ValueError(f"{len(rows)} decodes exceed the largest graph ({self.sizes[-1]})")
        self._stage(rows, b)
        self.replays[b] += 1
        if self.capture:
            self.graphs[b].replay()
        else:
            self._forward(b)
        return self.out[:len(rows)]
