"""Test helpers: a hand-driven paged KV cache that builds AttentionMetadata, and
tiny random HF models.

`PagedCacheSim(config)` owns per-layer caches (in TorchPagedAttention's
layout) and per-sequence block tables; blocks are handed out sequentially (from 1,
so block 0 is only ever padding) as sequences grow. `step(chunks, num_decodes)`
takes `[(seq_id, token_ids), ...]` ordered decodes first, then prefill chunks,
and returns `(input_ids [T], positions [T], meta)` for one engine step.
"""
from __future__ import annotations

import torch

from batchlm.kernels.attention import AttentionMetadata, TorchPagedAttention
from batchlm.models import kv_cache_shape


class PagedCacheSim:
    def __init__(self, config, block_size: int = 4, num_blocks: int = 64,
                 dtype: torch.dtype = torch.float32):
        layers, kv_heads, head_dim = kv_cache_shape(config)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = [
            (torch.zeros(TorchPagedAttention.kv_cache_shape(num_blocks, block_size, kv_heads, head_dim), dtype=dtype),
             torch.zeros(TorchPagedAttention.kv_cache_shape(num_blocks, block_size, kv_heads, head_dim), dtype=dtype))
            for _ in range(layers)]
        self.tables: dict[object, list[int]] = {}
        self.lens: dict[object, int] = {}
        self.next_block = 1

    def _grow(self, seq_id, new_len: int) -> list[int]:
        table = self.tables.setdefault(seq_id, [])
        while len(table) * self.block_size < new_len:
            assert self.next_block < self.num_blocks, "out of cache blocks"
            table.append(self.next_block)
            self.next_block += 1
        return table

    def step(self, chunks: list[tuple[object, list[int]]], num_decodes: int):
        ids, positions, slots, seq_lens, query_lens = [], [], [], [], []
        for i, (seq_id, tokens) in enumerate(chunks):
            assert i >= num_decodes or len(tokens) == 1, "a decode has exactly one token"
            start = self.lens.get(seq_id, 0)
            end = start + len(tokens)
            table = self._grow(seq_id, end)
            ids += list(tokens)
            positions += list(range(start, end))
            slots += [table[p // self.block_size] * self.block_size + p % self.block_size
                      for p in range(start, end)]
            seq_lens.append(end)
            query_lens.append(len(tokens))
            self.lens[seq_id] = end
        max_blocks = max(len(self.tables[s]) for s, _ in chunks)
        block_tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int64)
        for i, (seq_id, _) in enumerate(chunks):
            t = self.tables[seq_id]
            block_tables[i, :len(t)] = torch.tensor(t)
        qsl = torch.zeros(len(chunks) + 1, dtype=torch.int64)
        qsl[1:] = torch.cumsum(torch.tensor(query_lens), 0)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=block_tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int64),
            query_start_loc=qsl,
            num_decodes=num_decodes,
            seq_lens_list=seq_lens,
            query_lens_list=query_lens,
            block_size=self.block_size,
        )
        return (torch.tensor(ids, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64),
                meta)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> None:
    """Give every parameter (biases and norm weights included) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if "norm" in name else noise)


def tiny_hf_model(config_cls, seed: int = 0, **overrides):
    """A tiny random fp32 HF causal LM built from `config_cls`."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize_(model, seed)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference relative to the reference's max magnitude."""
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
