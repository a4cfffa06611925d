"""Paged attention: the interface every attention implementation follows, and
its PyTorch reference.

Contract
--------
One step of the engine runs a flat batch of T tokens from S sequences. The
first `num_decodes` sequences are decodes (exactly one query token each, the
first `num_decodes` tokens of the batch); the rest are prefills (one chunk of
one or more prompt tokens each, contiguous, in order).

`forward(q, k, v, k_cache, v_cache, meta, scale)`:
  q: [T, H, D]; k, v: [T, KVH, D] (rotary already applied);
  k_cache, v_cache: [num_blocks, block_size, KVH, D] for this layer.
  It first writes k, v into the cache at `meta.slot_mapping` (slot =
  block_id * block_size + offset), then returns out: [T, H, D], where each
  query token attends causally to every cached token of its own sequence up to
  and including its own position (prefix-cached and earlier-chunk tokens
  included). H must be a multiple of KVH (grouped-query attention).

It knows nothing about requests, scheduling or sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Per-step inputs of attention, built by the model runner.

    NOTE: sequences are ordered decodes first, then prefills; tokens follow the
    same order. All tensors live on the model's device.
    """

    slot_mapping: torch.Tensor  # [T] int64: cache slot of each token of the step
    block_tables: torch.Tensor  # [S, max_blocks] int64, padded with 0
    seq_lens: torch.Tensor  # [S] int64: tokens in the cache after this step
    query_start_loc: torch.Tensor  # [S + 1] int64: cumulative query lengths
    num_decodes: int
    # Host-side copies for the CPU path (avoid device syncs).
    seq_lens_list: list[int]
    query_lens_list: list[int]
    block_size: int


class TorchPagedAttention:
    """PyTorch reference: correct anywhere, the CPU path of the engine."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float):
        T, H, D = q.shape
        KVH = k.shape[1]
        # Write the new keys/values into their slots.
        k_cache.view(-1, KVH, D).index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.view(-1, KVH, D).index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale)
        start = nd
        for i in range(nd, len(meta.seq_lens_list)):
            qlen = meta.query_lens_list[i]
            ctx = meta.seq_lens_list[i]
            out[start:start + qlen] = self._prefill(
                q[start:start + qlen], k[start:start + qlen], v[start:start + qlen],
                k_cache, v_cache, meta.block_tables[i], ctx, meta.block_size, scale)
            start += qlen
        return out

    @staticmethod
    def _decode(q, k_cache, v_cache, meta, scale):
        # q: [B, H, D] -> one query per sequence, batched over a padded gather.
        B, H, D = q.shape
        KVH = k_cache.shape[2]
        max_len = max(meta.seq_lens_list[:B])
        nb = -(-max_len // meta.block_size)
        tables = meta.block_tables[:B, :nb]  # [B, nb]
        keys = k_cache[tables].view(B, nb * meta.block_size, KVH, D).transpose(1, 2)  # [B, KVH, L, D]
        vals = v_cache[tables].view(B, nb * meta.block_size, KVH, D).transpose(1, 2)
        L = nb * meta.block_size
        pos = torch.arange(L, device=q.device)
        mask = (pos[None, :] < meta.seq_lens[:B, None])[:, None, None, :]  # [B, 1, 1, L]
        o = F.scaled_dot_product_attention(
            q[:, :, None, :], keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask,
            scale=scale, enable_gqa=H != KVH)  # [B, H, 1, D]
        return o[:, :, 0, :]

    @staticmethod
    def _prefill(q, k, v, k_cache, v_cache, table, ctx, block_size, scale):
        # q: [Q, H, D]; attends to ctx cached tokens, the last Q of which are its own.
        Q, H, D = q.shape
        KVH = k.shape[1]
        if ctx == Q:  # nothing cached before this chunk: use k, v directly
            keys, vals = k, v
            mask, causal = None, True
        else:
            nb = -(-ctx // block_size)
            keys = k_cache[table[:nb]].reshape(-1, KVH, D)[:ctx].to(q.dtype)
            vals = v_cache[table[:nb]].reshape(-1, KVH, D)[:ctx].to(q.dtype)
            qpos = torch.arange(ctx - Q, ctx, device=q.device)
            mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]  # [Q, ctx]
            causal = False
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1),
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=H != KVH)
        return o.transpose(0, 1)
