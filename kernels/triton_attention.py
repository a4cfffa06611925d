"""Triton paged attention: the contract of batchlm.kernels.attention, as GPU
kernels that read the paged cache in place.

Contract
--------
`TritonPagedAttention(device)` has TorchPagedAttention's interface
(`kv_cache_shape`, `forward(q, k, v, k_cache, v_cache, meta, scale, window)`),
the same cache layout [KVH, num_blocks, block_size, D] and the same results
(within float rounding). Three launches per layer and step:
- `write_kv`: k, v [T, KVH, D] into their cache slots (`meta.slot_mapping`).
- `paged_decode`: the first `num_decodes` tokens (one query each). The
  context of each sequence is split across programs (split-K) when there
  are too few sequences to fill the device (`decode_split`), each program
  reading its blocks a tile of tokens at a time (`DECODE_TILING`); a second
  kernel merges the partial softmaxes.
- `paged_prefill`: the other sequences' query chunks (one or more tokens,
  e.g. speculative tokens to verify) attend to their cached prefix blocks and
  causally to themselves, read from the cache after `write_kv`.
Each takes its output tensor and writes every element of it.

Supported: block sizes 16 and 32 and head dims >= 16 (`tl.dot` needs
tiles of at least 16); cache dtype float32, bfloat16 or float16. On the CPU
the kernels run only in Triton's interpreter: TRITON_INTERPRET=1 must be in
the environment before the process imports triton (`interpreter_enabled`).

`launch_configs(...)` lists every (kernel, signature, constexprs) the launch
code can choose for a model's shapes; the tests compile each ahead of time
for sm_80 and sm_90, since the interpreter accepts code no GPU compiles.

It knows nothing about requests, scheduling or sampling.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from batchlm.kernels.attention import AttentionMetadata

SUPPORTED_BLOCK_SIZES = (16, 32)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DecodeTiling(NamedTuple):
    """How one decode program walks its cache blocks: `tile` tokens at a time
    (a power of two >= 16, for tl.dot), with these launch options."""

    tile: int
    num_warps: int
    num_stages: int


class DecodeSplit(NamedTuple):
    """Programs per (sequence, kv head) (split-K), and cache blocks per program."""

    num_splits: int
    split_blocks: int


# NOTE: chosen on an H100 by `python -m batchlm bench kernels --decode-sweep`
# (2026-11-26; README, GPUs). The decode kernels alone, copy 3001 GB/s:
# 256 seqs x 1024 ctx 89.7 us = 75% of copy (the best of the sweep's 48
# tiling and split choices 87.1 us; one-block tiles, as the kernel had
# before, 142 us, timed then with the host waiting after each call);
# 32 x 2048 at 6 splits 36.6 us (best 33.3); 8 x 4096 at 16 splits 22.5 us
# (best 22.0). 64-token tiles with 4 warps
# were 2% faster at 256 seqs but 2x slower at 8 seqs x 4096.
DECODE_TILING = DecodeTiling(tile=128, num_warps=8, num_stages=3)
# The least a split may hold, and how many programs fill an SM: a step of
# few sequences splits their contexts until PROGRAMS_PER_SM x SMs programs
# run, never into pieces below MIN_SPLIT_BLOCKS blocks.
MIN_SPLIT_BLOCKS = 16
PROGRAMS_PER_SM = 4
# What `bench kernels --decode-sweep` tries (CUDA): fixed split sizes and
# decode_split's own choice (None), under each tiling.
DECODE_SWEEP = tuple((split, DecodeTiling(t, w, n)) for t in (32, 64, 128) for w in (4, 8) for n in (2, 3)
                     for split in (None, 16, 32, 64))
PREFILL_BLOCK_M = 16  # query tokens per prefill program (>= 16 for tl.dot)
PREFILL_NUM_WARPS = 4
_INTERPRETED = isinstance(tl.standard.cdiv, InterpretedFunction)  # see interpreter_enabled


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, cache_head_stride,
                     KVH: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (T,): one token's keys and values, every kv head.
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    m = (h < KVH)[:, None] & (d < D)[None, :]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    key = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=m)
    val = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m)
    dst = h[:, None].to(tl.int64) * cache_head_stride + slot * D + d[None, :]  # cache viewed as [KVH, slots, D]
    tl.store(k_cache_ptr + dst, key.to(k_cache_ptr.dtype.element_ty), mask=m)
    tl.store(v_cache_ptr + dst, val.to(v_cache_ptr.dtype.element_ty), mask=m)


@triton.jit
def _online_softmax_step(acc, m_i, l_i, scores, val_ptrs, kv_mask, dot_dtype):
    """One key tile of streaming softmax attention: scores [R, N] (-inf where
    masked) and the tile's values -> the running (acc, max, sum). A row that sees
    nothing in this tile keeps a finite max, so exp() gives 0, not NaN."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    val = tl.load(val_ptrs, mask=kv_mask, other=0.0).to(dot_dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), val, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["window", "num_splits", "split_blocks"])
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, seq_lens_ptr,
                         part_acc_ptr, part_ml_ptr, out_ptr, scale, window, num_splits, split_blocks,
                         stride_qt, stride_qh, stride_ot, stride_oh, stride_table, cache_head_stride,
                         G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         TILE: tl.constexpr, DIRECT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # grid (B, KVH, num_splits): the G query heads of kv head `kvh` of
    # sequence b, over cache blocks [first + s * split_blocks, first + (s + 1) * split_blocks),
    # TILE tokens (TILE / BLOCK_SIZE cache blocks) per loop iteration: each
    # token's block id comes from the table, so one tile's loads span several
    # scattered blocks and are issued together.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    H = tl.num_programs(1) * G
    ctx = tl.load(seq_lens_ptr + b).to(tl.int32)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # window: positions (ctx - W, ctx]
    tok_start = (lo // BLOCK_SIZE + s * split_blocks) * BLOCK_SIZE
    tok_end = tl.minimum(tok_start + split_blocks * BLOCK_SIZE, ctx)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    heads = kvh * G + g
    q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    offs = tl.arange(0, TILE)
    head_base = kvh.to(tl.int64) * cache_head_stride
    table = tables_ptr + b.to(tl.int64) * stride_table
    for t0 in range(tok_start, tok_end, TILE):
        pos = t0 + offs
        inside = pos < tok_end
        valid = inside & (pos >= lo)
        block_id = tl.load(table + pos // BLOCK_SIZE, mask=inside, other=0).to(tl.int64)
        rows = head_base + (block_id * BLOCK_SIZE + pos % BLOCK_SIZE)[:, None] * D + d[None, :]
        kv_mask = valid[:, None] & dm[None, :]
        key = tl.load(k_cache_ptr + rows, mask=kv_mask, other=0.0).to(q.dtype)  # [TILE, BLOCK_D]
        scores = tl.dot(q, tl.trans(key), input_precision="ieee") * scale  # [BLOCK_G, TILE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, scores, v_cache_ptr + rows, kv_mask, q.dtype)
    if DIRECT:  # one split: this program saw the whole context (l_i > 0), so no merge
        o = acc / tl.where(gm, l_i, 1.0)[:, None]
        tl.store(out_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=gm[:, None] & dm[None, :])
    else:
        # Partials: acc [B, H, S, D] (unnormalized), (m, l) [B, H, S, 2]; an empty split leaves (-inf, 0).
        part = (b * H + heads).to(tl.int64) * num_splits + s
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
        tl.store(part_ml_ptr + part * 2, m_i, mask=gm)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=gm)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(part_acc_ptr, part_ml_ptr, out_ptr, num_splits, stride_ot, stride_oh,
                          D: tl.constexpr, BLOCK_D: tl.constexpr):
    # grid (B, H): merge the num_splits partial softmaxes of one query head.
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    base = (b * tl.num_programs(1) + h).to(tl.int64) * num_splits
    m = tl.load(part_ml_ptr + base * 2)  # split 0 is never empty
    l_sum = tl.load(part_ml_ptr + base * 2 + 1)
    acc = tl.load(part_acc_ptr + base * D + d, mask=dm, other=0.0)
    for s in range(1, num_splits):
        m_s = tl.load(part_ml_ptr + (base + s) * 2)
        l_s = tl.load(part_ml_ptr + (base + s) * 2 + 1)
        acc_s = tl.load(part_acc_ptr + (base + s) * D + d, mask=dm, other=0.0)
        m_new = tl.maximum(m, m_s)
        a = tl.exp(m - m_new)
        c = tl.exp(m_s - m_new)  # 0 for an empty split (m_s = -inf)
        acc = acc * a + acc_s * c
        l_sum = l_sum * a + l_s * c
        m = m_new
    tl.store(out_ptr + b * stride_ot + h * stride_oh + d, (acc / l_sum).to(out_ptr.dtype.element_ty), mask=dm)


# NOTE: integer arguments that change from step to step are not specialized
# (Triton would otherwise compile a variant for values equal to 1 or
# divisible by 16: a compile of ~0.3 s in the middle of a run).
@triton.jit(do_not_specialize=["window", "first_seq"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, tables_ptr, seq_lens_ptr, qstart_ptr,
                    scale, window, first_seq, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_table, cache_head_stride,
                    G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # grid (sequences, H, query blocks): BLOCK_M query tokens of sequence
    # first_seq + pid0, query head h; the chunk's last token sits at ctx - 1.
    i = first_seq + tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q0 = tl.load(qstart_ptr + i).to(tl.int32)
    qlen = tl.load(qstart_ptr + i + 1).to(tl.int32) - q0
    if mb * BLOCK_M < qlen:
        ctx = tl.load(seq_lens_ptr + i).to(tl.int32)
        r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = r < qlen
        qpos = ctx - qlen + r  # [BLOCK_M]
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        q = tl.load(q_ptr + (q0 + r)[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :],
                    mask=rm[:, None] & dm[None, :], other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
        first_q = ctx - qlen + mb * BLOCK_M
        last_q = tl.minimum(first_q + BLOCK_M, ctx) - 1
        kstart = tl.where(window > 0, tl.maximum(first_q - window + 1, 0), 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        offs = tl.arange(0, BLOCK_SIZE)
        head_base = (h // G).to(tl.int64) * cache_head_stride
        for blk in range(kstart // BLOCK_SIZE, last_q // BLOCK_SIZE + 1):
            block_id = tl.load(tables_ptr + i * stride_table + blk).to(tl.int64)
            kpos = blk * BLOCK_SIZE + offs
            rows = head_base + (block_id * BLOCK_SIZE + offs)[:, None] * D + d[None, :]
            kv_mask = (kpos <= last_q)[:, None] & dm[None, :]
            key = tl.load(k_cache_ptr + rows, mask=kv_mask, other=0.0).to(q.dtype)
            scores = tl.dot(q, tl.trans(key), input_precision="ieee") * scale  # [BLOCK_M, BLOCK_SIZE]
            allowed = kpos[None, :] <= qpos[:, None]
            allowed = allowed & ((window <= 0) | (kpos[None, :] > qpos[:, None] - window))
            scores = tl.where(allowed, scores, float("-inf"))
            # a row may see nothing in this block (all before its window): see the helper
            acc, m_i, l_i = _online_softmax_step(acc, m_i, l_i, scores, v_cache_ptr + rows, kv_mask, q.dtype)
        l_i = tl.where(rm, l_i, 1.0)
        o = acc / l_i[:, None]
        tl.store(out_ptr + (q0 + r)[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=rm[:, None] & dm[None, :])


def _block_g(G: int) -> int:
    return max(16, triton.next_power_of_2(G))


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def write_kv(k, v, k_cache, v_cache, slot_mapping):
    """k, v: [T, KVH, D] (any strides with a unit last one) -> cache slots."""
    T, KVH, D = k.shape
    if T == 0:
        return
    k, v = _unit_last(k), _unit_last(v)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), **_write_constexprs(KVH, D), num_warps=WRITE_NUM_WARPS)


def attended_blocks(seq_lens: list[int], block_size: int, window: int | None) -> int:
    """The most cache blocks one of these decodes reads (its window's, if any)."""
    most = 1
    for ctx in seq_lens:
        lo = max(0, ctx - window) if window else 0
        most = max(most, -(-ctx // block_size) - lo // block_size)
    return most


def decode_split(most_blocks: int, num_seqs: int, num_kv_heads: int, target_programs: int | None,
                 min_split_blocks: int = MIN_SPLIT_BLOCKS) -> DecodeSplit:
    """Split each (sequence, kv head) into as many programs as it takes to
    reach `target_programs` in all (None: no limit), into pieces of at least
    `min_split_blocks` blocks; `most_blocks` is `attended_blocks`'s."""
    by_size = max(1, most_blocks // min_split_blocks)
    wanted = by_size if target_programs is None else -(-target_programs // (num_seqs * num_kv_heads))
    split_blocks = -(-most_blocks // max(1, min(by_size, wanted)))
    return DecodeSplit(-(-most_blocks // split_blocks), split_blocks)


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, window, out, split: DecodeSplit,
                 tiling: DecodeTiling = DECODE_TILING):
    """q: [B, H, D], one query per sequence at position seq_lens[b] - 1 -> out [B, H, D].
    `split` must cover every sequence's attended blocks (`decode_split`)."""
    B, H, D = q.shape
    KVH, _, bs, _ = k_cache.shape
    q = _unit_last(q)
    num_splits = split.num_splits
    direct = num_splits == 1  # the split kernel writes `out` itself, no partials to merge
    n_part = 0 if direct else B * H * num_splits
    part_acc = torch.empty(n_part * D, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(n_part * 2, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(B, KVH, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part_acc, part_ml, out, scale, window or 0, num_splits,
        split.split_blocks, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), **_decode_constexprs(H // KVH, D, bs, tiling, direct, _INTERPRETED),
        num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    if not direct:
        _decode_reduce_kernel[(B, H)](part_acc, part_ml, out, num_splits, out.stride(0), out.stride(1),
                                      D=D, BLOCK_D=_block_d(D), num_warps=1)


def paged_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, first_seq,
                  num_seqs, max_query_len, scale, window, out):
    """Query chunks of sequences [first_seq, first_seq + num_seqs): q, out [T, H, D]
    indexed by query_start_loc (the whole step's)."""
    T, H, D = q.shape
    KVH, _, bs, _ = k_cache.shape
    q = _unit_last(q)
    grid = (num_seqs, H, triton.cdiv(max_query_len, PREFILL_BLOCK_M))
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale, window or 0, first_seq,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), k_cache.stride(0),
        **_prefill_constexprs(H // KVH, D, bs, _INTERPRETED), num_warps=PREFILL_NUM_WARPS)


# One program per token for all its kv heads: one per (token, head), with
# 64 values each, was slower than torch's index_copy_ (66.9 vs 47.6 us at
# 4096 tokens x 3 kv heads on an H100).
WRITE_NUM_WARPS = 2


def _write_constexprs(KVH, D):
    return dict(KVH=KVH, D=D, BLOCK_H=triton.next_power_of_2(KVH), BLOCK_D=_block_d(D))


# NOTE: Triton 3.9's interpreter computes tl.dot on bfloat16/float16 tiles
# wrongly (garbage of ~1e9), so under the interpreter the attention kernels
# take their dot products in float32 (UPCAST_DOT); on a GPU they run in the
# activation dtype with float32 accumulation.
def _decode_constexprs(G, D, block_size, tiling=DECODE_TILING, direct=False, upcast_dot=False):
    return dict(G=G, D=D, BLOCK_G=_block_g(G), BLOCK_D=_block_d(D), BLOCK_SIZE=block_size,
                TILE=tiling.tile, DIRECT=direct, UPCAST_DOT=upcast_dot)


def _prefill_constexprs(G, D, block_size, upcast_dot=False):
    return dict(G=G, D=D, BLOCK_M=PREFILL_BLOCK_M, BLOCK_D=_block_d(D), BLOCK_SIZE=block_size,
                UPCAST_DOT=upcast_dot)


class LaunchConfig(NamedTuple):
    """One compiled variant of a kernel: what `triton.compile` needs."""

    kernel: object  # the @triton.jit function (a JITFunction outside the interpreter)
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict
    num_warps: int
    num_stages: int = 3  # Triton's default on NVIDIA


_TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def launch_configs(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                   dtype: torch.dtype, cache_dtype: torch.dtype | None = None) -> list[LaunchConfig]:
    """Every kernel variant the launch code above runs for these shapes on a GPU."""
    act, cache = "*" + _TRITON_DTYPES[dtype], "*" + _TRITON_DTYPES[cache_dtype or dtype]
    G, D = num_heads // num_kv_heads, head_dim

    def sig(kernel, types, consts):
        names = kernel.arg_names
        assert len(types) + len(consts) == len(names), f"{kernel.__name__}: signature out of date"
        types = dict(zip(names, types))
        types.update({n: "constexpr" for n in consts})
        return types

    write = _write_constexprs(num_kv_heads, D)
    pre = _prefill_constexprs(G, D, block_size)
    red = dict(D=D, BLOCK_D=_block_d(D))
    return [
        LaunchConfig(_write_kv_kernel, sig(_write_kv_kernel, [act, act, cache, cache, "*i64"] + ["i32"] * 5, write),
                     write, WRITE_NUM_WARPS),
        *(LaunchConfig(_decode_split_kernel, sig(_decode_split_kernel, [act, cache, cache, "*i64", "*i64", "*fp32",
                       "*fp32", act, "fp32"] + ["i32"] * 9, dec), dec, DECODE_TILING.num_warps,
                       DECODE_TILING.num_stages)
          for dec in (_decode_constexprs(G, D, block_size, direct=direct) for direct in (True, False))),
        LaunchConfig(_decode_reduce_kernel, sig(_decode_reduce_kernel, ["*fp32", "*fp32", act] + ["i32"] * 3, red),
                     red, 1),
        LaunchConfig(_prefill_kernel, sig(_prefill_kernel, [act, cache, cache, act, "*i64", "*i64", "*i64", "fp32",
                     "i32", "i32"] + ["i32"] * 6, pre), pre, PREFILL_NUM_WARPS),
    ]


class TritonPagedAttention:
    """Triton paged attention (see the module contract)."""

    name = "triton"

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        if device.type == "cpu" and not interpreter_enabled():
            raise ValueError(
                "attention_backend='triton' on the CPU runs Triton's interpreter: set "
                "TRITON_INTERPRET=1 in the environment before the process imports triton "
                "(or use attention_backend='torch')")
        # Under the interpreter (no SMs to fill) contexts split as finely as
        # MIN_SPLIT_BLOCKS allows, so that the CPU tests go through the merge.
        self.target_programs = (PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
                                if device.type == "cuda" else None)

    @staticmethod
    def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int):
        if block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"attention_backend='triton' needs block_size in {SUPPORTED_BLOCK_SIZES}, "
                             f"got {block_size}")
        if head_dim < 16:
            raise ValueError(f"attention_backend='triton' needs head_dim >= 16, got {head_dim}")
        return (num_kv_heads, num_blocks, block_size, head_dim)

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                window: int | None = None):
        if k_cache.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"attention_backend='triton' supports KV caches in "
                             f"{[str(t) for t in SUPPORTED_DTYPES]}, got {k_cache.dtype}")
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd, S = meta.num_decodes, len(meta.seq_lens_list)
        if nd:
            key = ("triton_split", window)
            split = meta.derived.get(key)
            if split is None:  # once per step and window, not per layer
                if meta.graph_max_blocks is not None:  # a CUDA graph: the most any replay needs
                    most = meta.graph_max_blocks
                else:
                    most = attended_blocks(meta.seq_lens_list[:nd], meta.block_size, window)
                split = meta.derived[key] = decode_split(most, nd, k_cache.shape[0], self.target_programs)
            paged_decode(q[:nd], k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window,
                         out[:nd], split)
        if S > nd:
            paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, nd,
                          S - nd, max(meta.query_lens_list[nd:]), scale, window, out)
        return out


def interpreter_enabled() -> bool:
    """Whether triton was imported under its interpreter (TRITON_INTERPRET=1
    in the environment before the process imported triton): the only way
    these kernels run on CPU tensors. The mode is fixed at that import (it
    decides what @triton.jit makes, triton's own library included)."""
    return _INTERPRETED
