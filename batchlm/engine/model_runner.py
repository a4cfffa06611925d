"""Model runner: scheduled sequences in, hidden states (and logits) out.

It owns the model and the paged KV cache tensors, and turns the scheduler's
plain list of (sequence, num_tokens) into the flat token batch and the
AttentionMetadata the attention backend needs. It knows nothing about
sampling, stopping or requests.

With `enable_cuda_graphs` (CUDA, a Triton attention backend: the engine
decides), steps where every sequence decodes one token replay a captured
CUDA graph (batchlm.engine.cuda_graphs);
other steps, and batches larger than max_num_seqs, run eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from batchlm.engine.graph_plan import DecodeRow
from batchlm.kernels.attention import AttentionMetadata


class LayoutEntry(NamedTuple):
    """One scheduled sequence in the flat batch."""

    seq: object  # Sequence
    num_tokens: int  # tokens run this step (speculative ones included)
    first_row: int  # row of its first token in `hidden`


@dataclass
class RunResult:
    hidden: torch.Tensor  # [T, hidden_size]
    layout: list[LayoutEntry]  # batch order


def _is_decode(seq, n: int) -> bool:
    """One query token past the prompt. NOTE: a prompt's last token alone (after a prefix-cache hit on
    the rest, or at a chunk boundary) is a prompt chunk of one, not a decode: the attention backends
    compute decodes and prompt chunks with different kernels (kernels/cpu_layers.py), and a prompt
    token then goes through the prompt kernel with or without a cache hit (its result can still
    differ in the last float bits: the linear layers' matmuls round by row count)."""
    return n == 1 and seq.num_computed_tokens >= seq.num_prompt_tokens


class ModelRunner:
    def __init__(self, model, attention, num_layers: int, num_kv_heads: int, head_dim: int,
                 num_blocks: int, block_size: int, kv_dtype: torch.dtype, device: torch.device):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.graphs = None  # DecodeGraphs, once enable_cuda_graphs ran
        # One (key, value) pair per layer, laid out as the attention backend wants.
        # NOTE: one block more than the block manager has: the CUDA graphs' padding rows write there.
        shape = attention.kv_cache_shape(num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device))
            for _ in range(num_layers)
        ]

    @staticmethod
    def bytes_per_block(num_layers, num_kv_heads, head_dim, block_size, kv_dtype: torch.dtype) -> int:
        elem = torch.tensor([], dtype=kv_dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * elem

    def _prepare(self, scheduled):
        # NOTE: decodes first, then prompt chunks: the attention backend relies
        # on this order. Decodes go longest first so that neighbours have
        # similar lengths (less padding when gathered). A decode is one query
        # token past the prompt (_is_decode).
        order = sorted(scheduled, key=lambda sn: (0, -sn[0].num_tokens) if _is_decode(*sn) else (1, 0))
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        tables: list[list[int]] = []
        layout = []
        num_decodes = 0
        for seq, n in order:
            c = seq.num_computed_tokens
            layout.append(LayoutEntry(seq, n, len(input_ids)))
            if _is_decode(seq, n):
                num_decodes += 1
                input_ids.append(seq.token_ids[c])
                positions.append(c)
                slots.append(seq.block_table[c // bs] * bs + c % bs)
            else:
                # NOTE: a speculating decode runs its last token and its proposals.
                src = seq.token_ids + seq.spec_token_ids if seq.spec_token_ids else seq.token_ids
                input_ids.extend(src[c:c + n])
                rng = range(c, c + n)
                positions.extend(rng)
                table = seq.block_table
                slots.extend([table[p // bs] * bs + p % bs for p in rng])
            seq_lens.append(c + n)
            query_lens.append(n)
            tables.append(seq.block_table)
        width = max(len(t) for t in tables)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        # NOTE: one host-to-device tensor for all six index arrays (views into
        # it below): on a GPU one copy instead of six; on the CPU 14 vs 18 us
        # per step at batch 1 (the Python loop above dominates at batch 64).
        T, S = len(input_ids), len(seq_lens)
        flat = input_ids + positions + slots + seq_lens + qsl
        for t in tables:
            flat += t
            flat += [0] * (width - len(t))
        buf = torch.tensor(flat, dtype=torch.long, device=self.device)
        ids, pos, slot_mapping, lens, starts, padded = buf.split([T, T, T, S, S + 1, S * width])
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=padded.view(S, width),  # padded with 0
            seq_lens=lens,
            query_start_loc=starts,
            num_decodes=num_decodes,
            seq_lens_list=seq_lens,
            query_lens_list=query_lens,
            block_size=bs,
            block_tables_list=tables,
        )
        return ids, pos, meta, layout

    def enable_cuda_graphs(self, max_num_seqs: int, max_model_len: int, hidden_size: int,
                           dtype: torch.dtype, capture: bool = True) -> None:
        """capture=False: the graphs' static forward, run eagerly (a CPU check; see cuda_graphs)."""
        from batchlm.engine.cuda_graphs import DecodeGraphs

        width = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(self.model, self.kv_caches, max_num_seqs, width, self.block_size,
                                   self.num_blocks, hidden_size, dtype, self.device, capture)

    def _graph_step(self, scheduled) -> RunResult | None:
        """The step through a CUDA graph, or None when it cannot take one."""
        g = self.graphs
        if (not g.fits(len(scheduled)) or not all(_is_decode(seq, n) for seq, n in scheduled)
                or any(len(seq.block_table) > g.width for seq, _ in scheduled)):
            return None
        order = sorted((seq for seq, _ in scheduled), key=lambda s: -s.num_tokens)  # as _prepare
        bs = self.block_size
        rows = []
        for seq in order:
            c = seq.num_computed_tokens
            rows.append(DecodeRow(seq.token_ids[c], c, seq.block_table[c // bs] * bs + c % bs, c + 1,
                                  seq.block_table))
        hidden = g.run(rows)  # [n, hidden]: a view of the graph's output, valid until the next step
        return RunResult(hidden, [LayoutEntry(seq, 1, i) for i, seq in enumerate(order)])

    @torch.inference_mode()
    def run(self, scheduled) -> RunResult:
        if self.graphs is not None:
            result = self._graph_step(scheduled)
            if result is not None:
                return result
        ids, pos, meta, layout = self._prepare(scheduled)
        hidden = self.model(ids, pos, self.kv_caches, meta)  # [T, hidden]
        return RunResult(hidden, layout)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """[len(rows), vocab] float32 logits of the chosen rows of `hidden`."""
        n = hidden.shape[0]
        if n and len(rows) == n and rows[0] == 0 and rows[-1] == n - 1 and rows == list(range(n)):
            # NOTE: every row, in order (a step of plain decodes): no index
            # tensor to copy over. On CUDA that copy (from a Python list, so
            # pageable) made the host wait for the forward before it could
            # queue the LM head; without it the host goes on to the sampling
            # bookkeeping while the device runs (not yet timed on a GPU).
            return self.model.compute_logits(hidden).float()
        idx = torch.tensor(rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, idx)).float()
