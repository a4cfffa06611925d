"""Paged attention: the interface every attention implementation follows, and
its PyTorch reference.

Contract
--------
One step of the engine runs a flat batch of T tokens from S sequences. The
first `num_decodes` sequences are decodes (exactly one query token each, the
first `num_decodes` tokens of the batch); the rest are prefills (one chunk of
one or more prompt tokens each, contiguous, in order).

The cache of one layer is a (k_cache, v_cache) pair, each of the shape the
backend's `kv_cache_shape(num_blocks, block_size, KVH, D)` returns; only the
backend reads or writes it. Slot `s` = block_id * block_size + offset.

`forward(q, k, v, k_cache, v_cache, meta, scale, window=None)`:
  q: [T, H, D]; k, v: [T, KVH, D] (rotary already applied; may be strided views).
  It first writes k, v into the cache at `meta.slot_mapping`, then returns
  out: [T, H, D], where each query token attends causally to every cached
  token of its own sequence up to and including its own position
  (prefix-cached and earlier-chunk tokens included). H must be a multiple of
  KVH (grouped-query attention: query head h reads kv head h // (H // KVH)).
  window: a sliding-window layer's size W, or None: a query at position p then
  sees only positions j with p - W < j <= p (transformers' convention).

It knows nothing about requests, scheduling or sampling.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

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
    # Host-side block tables (unpadded), or None: a backend then reads
    # block_tables (on the CPU only; on a GPU that would sync).
    block_tables_list: list[list[int]] | None = None
    # Per-step values a backend derives once and reuses in every layer (masks,
    # index tensors). Owned by the backend; starts empty each step.
    derived: dict = field(default_factory=dict)
    # Set under CUDA-graph capture (engine/cuda_graphs.py): the most blocks a sequence holds. The host
    # lists are then placeholders: launch shapes come from this bound (only Triton's backend is captured).
    graph_max_blocks: int | None = None


class _DecodeGroup(NamedTuple):
    """Decode sequences [start, end) attended to together (TorchPagedAttention._decode)."""

    start: int
    end: int
    nb: int  # blocks gathered per sequence (the longest one's)
    # Set when the group is one sequence whose nb blocks are consecutive ids
    # in the cache: its keys and values are read in place, nothing is gathered.
    first_block: int | None
    rows: torch.Tensor | None  # cache rows to gather (_rows); None with first_block
    pad: torch.Tensor | None  # [1, b, 1, L] additive mask of the padding; None with first_block
    tables: torch.Tensor | None  # [b, nb] block tables; None with first_block


# fp8 KV caches (kv_cache_dtype="fp8", CUDA): stored as e4m3 bytes, moved as
# uint8 (CUDA has no fp8 index_copy_), read into the queries' dtype.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """An fp8 tensor viewed as uint8 (the same bytes); any other as is."""
    return t.view(torch.uint8) if t.dtype in FP8_DTYPES else t


def _compute_dtype(cache_dtype: torch.dtype, q_dtype: torch.dtype) -> torch.dtype:
    """What decode attention computes in over a cache of `cache_dtype`: the
    cache's dtype, except an fp8 cache, read into the queries' dtype."""
    return q_dtype if cache_dtype in FP8_DTYPES else cache_dtype


class TorchPagedAttention:
    """PyTorch reference: correct anywhere, and the CPU path of the engine.

    Cache layout: [KVH, num_blocks, block_size, D] (head-major), so that the
    blocks of a batch gather into [KVH, B, L, D], whose per-(head, sequence)
    [L, D] matrices are contiguous and feed batched matmuls without copies.

    NOTE: slots that were never written must hold finite values (the runner
    zero-fills the cache): masked positions get probability 0, and 0 * NaN
    would still poison the output.

    NOTE: the instance keeps grow-only scratch buffers for the decode gather
    (fresh multi-MB allocations each layer cost more in page faults than the
    copy itself on CPU). One instance serves one engine, one step at a time.

    On the CPU, a sequence whose blocks have consecutive ids is read in
    place, as strided views of the cache, when it decodes alone in its group
    or prefills after cached tokens (IN_PLACE_DTYPES, _decode_one). At
    batch 1 that is the usual case until the block manager's free list wraps
    around (it starts in id order; freed sequences come back tail first);
    other tables take the gather path.
    """

    name = "torch"

    def __init__(self):
        self._scratch: dict[str, torch.Tensor] = {}

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int):
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def _buffer(self, name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
            buf = torch.empty(max(numel, int(numel * 1.25)), dtype=like.dtype, device=like.device)
            self._scratch[name] = buf
        return buf[:numel]

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                window: int | None = None):
        T, H, D = q.shape
        KVH = k.shape[1]
        # Write the new keys/values into their slots: cache viewed as [KVH, slots, D].
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)  # [KVH, T, D]
        if kt.dtype != k_cache.dtype:
            kt, vt = kt.to(k_cache.dtype), vt.to(v_cache.dtype)
        _bytes(k_cache).view(KVH, -1, D).index_copy_(1, meta.slot_mapping, _bytes(kt))
        _bytes(v_cache).view(KVH, -1, D).index_copy_(1, meta.slot_mapping, _bytes(vt))
        nd = meta.num_decodes
        if nd == T:  # decodes only (most steps of a batch job): no copy into `out`
            return self._decode(q, k_cache, v_cache, meta, scale, window)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta, scale, window)
        start = nd
        for i in range(nd, len(meta.seq_lens_list)):
            qlen = meta.query_lens_list[i]
            ctx = meta.seq_lens_list[i]
            out[start:start + qlen] = self._prefill(
                q[start:start + qlen], k[start:start + qlen], v[start:start + qlen],
                k_cache, v_cache, meta, i, scale, window)
            start += qlen
        return out

    @staticmethod
    def _rows(cache, tables):
        # Row indices of `tables`' blocks in the cache viewed as [KVH * NB, bs * D]:
        # one index_select over whole contiguous blocks (about 1.7x faster on CPU
        # than selecting along dim 1 of the 4-d cache).
        KVH, NB = cache.shape[:2]
        heads = torch.arange(0, KVH * NB, NB, device=tables.device)
        return (heads[:, None] + tables.reshape(1, -1)).reshape(-1)

    def _gather(self, name, cache, rows, B, nb, dtype=None):
        # cache: [KVH, NB, bs, D]; rows from _rows(cache, tables [B, nb]) -> [KVH, B, nb * bs, D],
        # in `dtype` when given (an fp8 cache is gathered as bytes, then converted).
        KVH, NB, bs, D = cache.shape
        raw = _bytes(cache)
        buf = self._buffer(name, rows.numel() * bs * D, raw).view(-1, bs * D)
        torch.index_select(raw.view(KVH * NB, bs * D), 0, rows, out=buf)
        out = buf.view(cache.dtype).view(KVH, B, nb * bs, D)
        return out if dtype is None or dtype == out.dtype else out.to(dtype)

    # Decode sequences are gathered in groups of about this many cached tokens,
    # so a group's gathered keys stay in the CPU's last-level cache between
    # the gather and the matmul that reads them.
    GROUP_TOKENS = 8192

    def _decode_groups(self, meta, B, k_cache, q_dtype) -> list[_DecodeGroup]:
        groups = meta.derived.get("decode_groups")
        if groups is not None:
            return groups
        groups, lens, bs = [], meta.seq_lens_list[:B], meta.block_size
        in_place = k_cache.device.type == "cpu" and k_cache.dtype in self.DECODE_IN_PLACE_DTYPES
        i = 0
        while i < B:  # once per step, not per layer
            j, width = i, 0
            while j < B:
                w = max(width, -(-lens[j] // bs) * bs)
                if j > i and w * (j + 1 - i) > self.GROUP_TOKENS:
                    break
                width, j = w, j + 1
            nb = width // bs
            first = self._first_block(meta, i, nb) if in_place and j == i + 1 else None
            if first is not None:
                groups.append(_DecodeGroup(i, j, nb, first, None, None, None))
            else:
                pad = torch.arange(width, device=meta.seq_lens.device)[None, :] >= meta.seq_lens[i:j, None]
                bias = torch.zeros(pad.shape, dtype=_compute_dtype(k_cache.dtype, q_dtype), device=pad.device
                                   ).masked_fill_(pad, float("-inf"))
                tables = meta.block_tables[i:j, :nb]
                groups.append(_DecodeGroup(i, j, nb, None, self._rows(k_cache, tables),
                                           bias[None, :, None, :], tables))
            i = j
        meta.derived["decode_groups"] = groups
        return groups

    # Cache dtypes whose consecutive blocks a prefill reads in place on the
    # CPU. Not bfloat16: its bmm on strided views of the cache is slower than
    # the gather path (measured at 300 and 1000 cached tokens: 91-100 vs
    # 66-89 us, 295-321 vs 175-200 us).
    IN_PLACE_DTYPES = (torch.float32,)
    # ... and those a lone decode reads in place (_decode_one).
    DECODE_IN_PLACE_DTYPES = (torch.float32, torch.bfloat16)
    # Cache dtypes a lone CPU decode hands to SDPA's flash kernel when q
    # shares the dtype (_decode_one): bf16 read in place, float32 accumulation.
    # Default model's shapes, 1 thread, 2026-11-26, vs the upcast below: 29 vs
    # 56 us at 300 cached tokens, 64 vs 218 at 1000, 123 vs 496 at 2000; mean
    # error vs float64 0.71e-3 vs 0.64e-3 at 300 (its probabilities are bf16).
    SDPA_DTYPES = (torch.bfloat16,)
    # Otherwise (a float32 model over a bf16 cache) a lone decode computes in
    # float32: CPU bf16 bmm is slower here (2 threads: 49 vs 88 us at 300
    # cached tokens). At batch 1 a bf16 cache whose blocks are not consecutive
    # is gathered, then read as in place (not the masked baddbmm path).
    UPCAST_DTYPES = (torch.bfloat16,)

    @staticmethod
    def _first_block(meta, i, nb) -> int | None:
        """The id of sequence i's first block if its first nb blocks have
        consecutive ids (in the cache they then form one [KVH, nb * bs, D]
        view), else None. Host-side; only called on the CPU."""
        tables = meta.block_tables_list
        table = tables[i] if tables is not None else meta.block_tables[i, :nb].tolist()
        b0 = table[0]
        if table[nb - 1] - b0 != nb - 1 or table[:nb] != list(range(b0, b0 + nb)):
            return None
        return b0

    def _decode(self, q, k_cache, v_cache, meta, scale, window):
        # q: [B, H, D], one query per sequence -> [B, H, D]. NOTE: the runner
        # orders decodes by length, so each group's padded gather wastes little.
        B, H, D = q.shape
        KVH = k_cache.shape[0]
        G = H // KVH
        groups = self._decode_groups(meta, B, k_cache, q.dtype)
        compute = _compute_dtype(k_cache.dtype, q.dtype)
        cpu = q.device.type == "cpu"
        if B == 1 and (groups[0].first_block is not None or (cpu and k_cache.dtype in self.UPCAST_DTYPES)):
            # batch 1: the fewest ops (a bf16 cache is gathered, then as in place)
            first, nb = groups[0].first_block, groups[0].nb
            keys = self._gather("k", k_cache, groups[0].rows, 1, nb)[:, 0] if first is None else None
            vals = self._gather("v", v_cache, groups[0].rows, 1, nb)[:, 0] if first is None else None
            o = self._decode_one(q, scale, k_cache, v_cache, first, meta.seq_lens_list[0], window,
                                 keys, vals).view(1, H, D)
            return o if o.dtype == q.dtype else o.to(q.dtype)
        qs = (q * scale).view(B, KVH, G, D).transpose(0, 1)  # [KVH, B, G, D]
        if qs.dtype != compute:
            qs = qs.to(compute)
        out = None if len(groups) == 1 else torch.empty_like(q)
        for i, j, nb, first, rows, pad, tables in groups:
            b = j - i
            if first is not None:
                o = self._decode_one(qs[:, i], 1.0, k_cache, v_cache, first, meta.seq_lens_list[i],
                                     window).view(KVH, 1, G, D).to(qs.dtype)
            else:
                if window is not None:
                    pad = self._window_bias(meta, i, j, pad, window)
                keys = self._gather("k", k_cache, rows, b, nb, compute)  # [KVH, b, L, D]
                if cpu:
                    o = self._decode_cpu(qs[:, i:j], keys, v_cache, pad, meta, i, tables, window)
                else:
                    # SDPA sees batch=KVH, heads=b, G queries each: no GQA expansion.
                    vals = self._gather("v", v_cache, rows, b, nb, compute)
                    o = F.scaled_dot_product_attention(qs[:, i:j], keys, vals, attn_mask=pad, scale=1.0)
            # o: [KVH, b, G, D]
            if out is None:  # one group: a view when b == 1, else one copy
                o = o.transpose(0, 1).reshape(B, H, D)
                return o if o.dtype == q.dtype else o.to(q.dtype)
            out[i:j].view(b, KVH, G, D).copy_(o.transpose(0, 1))
        return out

    @staticmethod
    def _decode_one(q, scale, k_cache, v_cache, first, ctx, window, keys=None, vals=None):
        # One sequence attended alone, nothing masked or padded. With `first`:
        # its blocks are consecutive from there, its ctx positions are slots
        # first * bs + [0, ctx) of the cache, read in place as strided views
        # (nothing gathered). Otherwise keys/vals are its gathered blocks
        # [KVH, nb * bs, D]. q: the H = KVH * G heads ([1, H, D] or [KVH, G,
        # D]), scaled by `scale` -> viewable as [KVH, G, D] or [1, H, D]; in
        # q's dtype through SDPA (SDPA_DTYPES), else float32 over a bf16 cache.
        # fp32, one thread: 26-28 vs 54-67 us at 300 cached tokens, 76-103 vs
        # 234-291 us at 1000 against the gather + baddbmm + embedding_bag path.
        KVH, NB, bs, D = k_cache.shape
        lo = max(0, ctx - window) if window is not None else 0  # window: positions (ctx - W, ctx]
        start, L = lo, ctx - lo
        if first is not None:
            start += first * bs
        if q.dtype == k_cache.dtype and q.dtype in TorchPagedAttention.SDPA_DTYPES and q.device.type == "cpu":
            # [1, KVH, L, D] views; the H heads as one query each, grouped onto
            # the KVH heads by enable_gqa (faster here than G queries per head).
            if first is not None:
                keys = k_cache.view(1, KVH, NB * bs, D).narrow(2, start, L)
                vals = v_cache.view(1, KVH, NB * bs, D).narrow(2, start, L)
            else:
                keys, vals = keys.narrow(1, start, L)[None], vals.narrow(1, start, L)[None]
            return F.scaled_dot_product_attention(q.reshape(1, -1, 1, D), keys, vals, scale=scale,
                                                  enable_gqa=True)  # [1, H, 1, D]
        if first is not None:
            keys, vals = k_cache.view(KVH, NB * bs, D), v_cache.view(KVH, NB * bs, D)
        keys = keys.narrow(1, start, L)  # [KVH, L, D]
        vals = vals.narrow(1, start, L)
        q = q.reshape(KVH, -1, D)  # [KVH, G, D]
        qs = q * scale if scale != 1.0 else q
        if keys.dtype in TorchPagedAttention.UPCAST_DTYPES:
            keys, vals = keys.float(), vals.float()
        if qs.dtype != keys.dtype:
            qs = qs.to(keys.dtype)
        p = torch.softmax(torch.bmm(qs, keys.transpose(1, 2)), dim=-1)  # [KVH, G, L]
        return torch.bmm(p, vals)

    @staticmethod
    def _window_bias(meta, i, j, pad, window):
        # pad [1, b, 1, L] plus -inf before each decode's window (once per step, group and W).
        bias = meta.derived.get(("window", i, window))
        if bias is None:
            pos = torch.arange(pad.shape[-1], device=pad.device)
            early = pos[None, :] < (meta.seq_lens[i:j, None] - window)
            bias = meta.derived[("window", i, window)] = pad.masked_fill(early[None, :, None, :], float("-inf"))
        return bias

    def _decode_cpu(self, qs, keys, v_cache, pad, meta, i, tables, window):
        # Scores from the gathered keys, then the values are summed straight
        # out of the cache by embedding_bag (weights = probabilities), so the
        # values are read once and never copied: 10-20% less time than gathering
        # both and calling SDPA (measured on the default model's shapes).
        KVH, b, G, D = qs.shape
        L = keys.shape[2]
        bias = meta.derived.get(("bias", i, window))
        if bias is None:  # once per step and group (not per layer): the mask as a bmm input
            bias = meta.derived[("bias", i, window)] = pad.expand(KVH, b, G, L).reshape(KVH * b, G, L)
        s = torch.baddbmm(bias, qs.reshape(KVH * b, G, D), keys.view(KVH * b, L, D).transpose(1, 2))
        p = torch.softmax(s, dim=-1)  # [KVH * b, G, L]
        idx = meta.derived.get(("value_rows", i))
        if idx is None:  # once per step and group: the cache row of every (kvh, b, g, position)
            NB, bs = v_cache.shape[1], v_cache.shape[2]
            pos = torch.arange(L, device=qs.device)
            slots = tables[:, pos // bs] * bs + pos % bs  # [b, L]
            heads = torch.arange(0, KVH * NB * bs, NB * bs, device=qs.device)
            idx = (heads[:, None, None, None] + slots[None, :, None, :]).expand(KVH, b, G, L).reshape(KVH * b * G, L)
            meta.derived[("value_rows", i)] = idx
        o = F.embedding_bag(idx, v_cache.view(-1, D), mode="sum", per_sample_weights=p.view(-1, L))
        return o.view(KVH, b, G, D)

    # Prefill queries are processed in blocks of this many positions on the
    # CPU: block i only reads the keys up to its own last position (the causal
    # triangle is mostly skipped) and its scores stay cache-sized. 64 measured
    # fastest on the default model (prompts of 100-600 tokens: 95 ms vs 113 ms
    # at 128 and 101 ms at 32 for 40 prompts).
    PREFILL_QUERY_BLOCK = 64

    def _prefill(self, q, k, v, k_cache, v_cache, meta, i, scale, window):
        # q: [Q, H, D]; attends to ctx cached tokens, the last Q of which are its own.
        Q, H, D = q.shape
        KVH = k.shape[1]
        ctx, bs = meta.seq_lens_list[i], meta.block_size
        if ctx == Q:  # nothing cached before this chunk: use k, v directly
            keys, vals = k.transpose(0, 1), v.transpose(0, 1)  # [KVH, Q, D]
        else:
            nb = -(-ctx // bs)
            key = ("prefill_blocks", i)
            if key not in meta.derived:  # once per step, not per layer
                in_place = q.device.type == "cpu" and k_cache.dtype in self.IN_PLACE_DTYPES
                first = self._first_block(meta, i, nb) if in_place else None
                meta.derived[key] = (first, None if first is not None else
                                     self._rows(k_cache, meta.block_tables[i, :nb]))
            first, rows = meta.derived[key]
            if first is not None:
                # Consecutive blocks: read in place (as in _decode_one);
                # bitwise the same result, 1-7% less time than gathering
                # (measured: 256 new of 512, 512 of 2048, 100 of 1100 tokens).
                keys = k_cache[:, first:first + nb].view(KVH, nb * bs, D)
                vals = v_cache[:, first:first + nb].view(KVH, nb * bs, D)
            else:
                keys = _bytes(k_cache).view(-1, bs * D).index_select(0, rows).view(k_cache.dtype).view(KVH, nb * bs, D)
                vals = _bytes(v_cache).view(-1, bs * D).index_select(0, rows).view(v_cache.dtype).view(KVH, nb * bs, D)
            keys, vals = keys[:, :ctx].to(q.dtype), vals[:, :ctx].to(q.dtype)
        if q.device.type != "cpu":
            mask = None
            if ctx > Q or window is not None:  # [Q, ctx] additive bias
                qpos = torch.arange(ctx - Q, ctx, device=q.device)[:, None]
                kpos = torch.arange(ctx, device=q.device)[None, :]
                allowed = kpos <= qpos
                if window is not None:
                    allowed &= kpos > qpos - window
                mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys, vals, attn_mask=mask, is_causal=mask is None, scale=scale,
                enable_gqa=H != KVH)
            return o.transpose(0, 1)  # [Q, H, D]
        return self._prefill_blocked(q, keys, vals, scale, window)

    def _prefill_blocked(self, q, keys, vals, scale, window=None):
        # NOTE: PyTorch's CPU SDPA kernel reaches only ~20 GFLOP/s on this
        # model's shapes (head_dim 64, a few hundred queries); matmul + softmax
        # + matmul over query blocks is 3-4x faster (measured: 400 tokens 8.1 ms
        # vs 2.8 ms, 2048 tokens 238 ms vs 57 ms on 2 cores).
        Q, H, D = q.shape
        KVH, ctx = keys.shape[0], keys.shape[1]
        G = H // KVH
        # [KVH, Q * G, D]: the G query heads of a kv head are rows of one matmul
        # (query head h = kvh * G + g; row = position * G + g).
        qg = (q * scale).view(Q, KVH, G, D).transpose(0, 1).reshape(KVH, Q * G, D)
        out = torch.empty(KVH, Q * G, D, dtype=q.dtype, device=q.device)
        qb = self.PREFILL_QUERY_BLOCK
        for a in range(0, Q, qb):
            b = min(Q, a + qb)
            n, first = b - a, ctx - Q + a  # rows, position of the first
            kend = first + n  # the block's last query sits at position kend - 1
            # Keys [kstart, kend): with a window, none before the first row's.
            kstart = max(0, first - window + 1) if window is not None else 0
            s = torch.bmm(qg[:, a * G:b * G], keys[:, kstart:kend].transpose(1, 2))  # [KVH, n * G, width]
            # Only the last n columns can lie in the future of a query row...
            s[..., kend - kstart - n:].add_(self._triangle(n, G, s))
            if window is not None and first + n - 1 - window >= kstart:
                # ... and only the first n before a later row's window.
                cols = min(n, kend - kstart)
                r = torch.arange(n, device=q.device)[:, None]
                c = torch.arange(cols, device=q.device)[None, :]
                early = torch.zeros(n, cols, dtype=s.dtype, device=q.device).masked_fill_(
                    kstart + c <= first + r - window, float("-inf"))
                s[..., :cols].add_(early.repeat_interleave(G, dim=0))
            p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
            torch.bmm(p, vals[:, kstart:kend], out=out[:, a * G:b * G])
        return out.view(KVH, Q, G, D).transpose(0, 1).reshape(Q, H, D)

    def _triangle(self, n, G, like):
        # [n * G, n] additive causal mask (-inf above the diagonal, each row
        # repeated for the G heads of a kv head), built once per size.
        key = ("tri", n, G, like.dtype, like.device)
        tri = self._scratch.get(key)
        if tri is None:
            tri = torch.full((n, n), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)
            tri = self._scratch[key] = tri.repeat_interleave(G, dim=0)
        return tri
