"""Matmuls that read quantized weights, each beside its PyTorch reference.

Contract
--------
Every kernel computes `y[M, N] = x[M, K] @ W.T` for a weight held in one of
the packed forms below, with `x` and `y` in the model's compute dtype. The
reference of every form is `dequantize_*(...) -> float32 [N, K]` followed by
`F.linear` in float32; tests check each kernel against it on fresh random
inputs with the output poisoned first.

Packed forms (built from a batchlm.quantization GroupQuant by `pack_*`):
- Int8Packed: `codes` int8 [N, K], `scale` float32 [N] (one per output
  channel), `scale_c` the same in the compute dtype. w = scale * code.
- Int4Packed: torch's CPU tiled int4 layout (`_convert_weight_to_int4pack_for_cpu`):
  `packed` uint8 [Np, K/2] and `sz` [K/g, Np, 2] (scale, zero) in bfloat16,
  with Np = N rounded up to 64 (zero rows pad, sliced off). The kernel's
  convention is w = (code - 8) * scale + zero. NOTE: the tiled layout is
  torch's private business; `unpack_int4_codes` inverts it and `pack_int4`
  checks the inversion on every call, so a torch that changes it fails loudly.
- Int4Tiles (CPU, where kernels/cpu_native's library has its AVX-512 BF16
  loop; `pack_int4_auto` picks it there and Int4Packed elsewhere): `tiles`
  uint8 [Np/16, K/8, 64] (gemv.c's tile layout: 16 channels x 8 inputs per
  64 bytes), `scale` and `zero` bfloat16 [Np/16, K/g, 16] (as Int4Packed keeps
  them), Np = N rounded up to 16 (zero rows pad, sliced off):
  w = scale * code + zero.
- Fp8Packed (CUDA): `codes` float8_e4m3fn [N, K], `scale` float32 [N].

Kernels, chosen per shape and batch size by batchlm.quantization (measured):
- int8: `int8_native_mm` (kernels/native/gemv.c through kernels/cpu_native.py:
  a prefetching int8 GEMV for a few rows, float32 accumulate; only where the
  library builds, see `available`), `int8_native_gemm` (kernels/native/gemm.c:
  for many rows, the weight widened to bf16 a panel at a time in cache, then
  AVX-512 BF16 dot products, float32 sums; bf16 models on CPUs with AVX-512
  BF16 only, since it takes x in bf16), `int8_pack_mm` (aten._weight_int8pack_mm, bf16 activations),
  `int8_dequant_mm` (dequantize to the compute dtype, then F.linear, then the
  scales on the [M, N] output), `int8_dequant_scaled_mm` (the scales folded
  into the dequantized [N, K] weight: fewer products once M > K, e.g. prefill),
  `int8_dynamic_mm` (activations quantized per row to int8, aten._int_mm,
  int32 accumulate; exact integer math, so a row's result does not depend on
  the other rows in the batch).
- int4: `int4_native_mm` (Int4Tiles: gemv.c's AVX-512 BF16 GEMV, activations
  rounded to bf16, float32 sums), `int4_native_dequant_mm` (Int4Tiles: gemv.c
  dequantizes the weight transposed, then a bf16/float32 matmul; for many
  rows), `int4_native_gemm` (Int4Tiles: kernels/native/gemm.c, the
  weight dequantized a panel at a time in cache, as int4_native_dequant_mm
  rounds it, then AVX-512 BF16 dot products; bf16 models), `int4_pack_mm` (Int4Packed:
  aten._weight_int4pack_mm_for_cpu, bf16 activations), `int4_dequant_mm`
  (either form).
- fp8: `fp8_scaled_mm` (torch._scaled_mm, per-row activation scales).

What it does not know: modules, configs, files. No state between calls.
`available(fn, device, packed, dtype)` says whether a kernel runs on a
device here, on a weight in that packed form, for a model computing in that
dtype (None: any).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchlm.kernels import cpu_native

INT4_TILE_N = 64  # rows per tile of torch's CPU int4 layout


@dataclass
class Int8Packed:
    codes: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32
    scale_c: torch.Tensor  # [N] compute dtype


@dataclass
class Int4Packed:
    packed: torch.Tensor  # [Np, K/2] uint8, torch's CPU tiled layout
    sz: torch.Tensor  # [K/g, Np, 2] bfloat16: scale, zero (w = (q - 8) * scale + zero)
    n: int  # real output rows (Np - n rows of padding)
    group_size: int


@dataclass
class Int4Tiles:
    tiles: torch.Tensor  # [Np/16, K/8, 64] uint8, gemv.c's tile layout
    scale: torch.Tensor  # [Np/16, K/g, 16] bfloat16
    zero: torch.Tensor  # [Np/16, K/g, 16] bfloat16: w = scale * code + zero
    n: int  # real output rows (Np - n rows of padding)
    group_size: int


@dataclass
class Fp8Packed:
    codes: torch.Tensor  # [N, K] float8_e4m3fn
    scale: torch.Tensor  # [N] float32


# ---- int8 ---------------------------------------------------------------------
def pack_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8Packed:
    """codes int8 [N, K], scale [N] (per output channel)."""
    return Int8Packed(codes.contiguous(), scale.float().contiguous(), scale.to(dtype).contiguous())


def dequantize_int8(w: Int8Packed) -> torch.Tensor:
    return w.codes.float() * w.scale.unsqueeze(1)  # [N, K] float32


def int8_native_mm(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    y = cpu_native.library().int8_mm(x, w.codes, w.scale)  # [M, N], float32 or bfloat16
    return y if y.dtype == x.dtype else y.to(x.dtype)


def int8_native_gemm(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    return cpu_native.library().int8_gemm(x, w.codes, w.scale)  # [M, N] bfloat16 (x is)


def int8_pack_mm(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
    s = w.scale_c if w.scale_c.dtype == torch.bfloat16 else w.scale_c.to(torch.bfloat16)
    y = torch.ops.aten._weight_int8pack_mm(xb, w.codes, s)  # [M, N] bfloat16
    return y if y.dtype == x.dtype else y.to(x.dtype)


def int8_dequant_mm(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    return F.linear(x, w.codes.to(x.dtype)) * w.scale_c  # [M, N]


def int8_dequant_scaled_mm(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    # NOTE: one pass over the weight (int8 * scale -> compute dtype) and no pass over the output.
    # 2 threads, this Xeon, bf16, 2026-11-26: 3072x576 at 2048 rows 3.14 vs 4.16 ms for
    # int8_dequant_mm (bf16 F.linear alone 2.64); at 64 rows 0.60 vs 0.41. The plan measures both.
    return F.linear(x, torch.mul(w.codes, w.scale_c.unsqueeze(1)))  # [M, N]


def int8_dynamic_mm(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    x32 = x.float()
    sx = x32.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127.0  # [M, 1]
    xq = torch.round(x32 / sx).to(torch.int8)  # [M, K]
    acc = torch._int_mm(xq, w.codes.t())  # [M, N] int32
    return (acc * sx * w.scale).to(x.dtype)


def int8_dynamic_reference(x: torch.Tensor, w: Int8Packed) -> torch.Tensor:
    """The dynamic kernel's math in float32: per-row activation rounding included."""
    x32 = x.float()
    sx = x32.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    xq = torch.round(x32 / sx)
    return (xq @ w.codes.float().t()) * sx * w.scale


# ---- int4 ---------------------------------------------------------------------
def pack_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> Int4Packed:
    """codes uint8 0..15 [N, K], w = scale * code + zero per group ([N, K/g] each)."""
    n, k = codes.shape
    pad = -n % INT4_TILE_N
    q = codes.to(torch.int32)
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)  # [Np, K/2]
    if not torch.equal(unpack_int4_codes(packed, k), q.to(torch.uint8)):
        raise RuntimeError("torch's CPU int4 weight layout is not the one batchlm reads "
                           f"(torch {torch.__version__}); int4 is not available with this torch")
    # kernel: (q - 8) * s + z  ==  s * q + zero  =>  z = zero + 8 s
    sz = torch.stack([scale.float().t(), (zero.float() + 8 * scale.float()).t()], dim=-1)
    return Int4Packed(packed, sz.to(torch.bfloat16).contiguous(), n, group_size)


def unpack_int4_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Invert torch's CPU tiled int4 layout: uint8 [Np, K/2] -> codes uint8 [Np, K].
    Tile of 64 rows: byte j of input k holds row j (low nibble) and row j + 32 (high)."""
    np_ = packed.shape[0]
    p = packed.view(np_ // INT4_TILE_N, k, INT4_TILE_N // 2)  # [tiles, K, 32]
    both = torch.stack([p & 15, p >> 4], dim=1)  # [tiles, 2, K, 32]
    return both.permute(0, 1, 3, 2).reshape(np_, k)  # [Np, K]


def dequantize_int4(w: Int4Packed | Int4Tiles, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(w, Int4Tiles):
        s, z = (t[: w.n] for t in _tiles_scales(w))
        return _tiles_dequant(unpack_int4_tiles(w)[: w.n], s, z, w.group_size, dtype)  # [N, K]
    k = w.packed.shape[1] * 2
    codes = unpack_int4_codes(w.packed, k)[: w.n]  # [N, K]
    g = w.group_size
    sz = w.sz[:, : w.n].to(dtype)  # [K/g, N, 2]
    q = codes.to(dtype).view(w.n, k // g, g) - 8
    return (q * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)).view(w.n, k)


TILE_N, TILE_K = 16, 8  # Int4Tiles: channels x inputs per 64-byte tile


def pack_int4_tiles(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> Int4Tiles:
    """codes uint8 0..15 [N, K], w = scale * code + zero per group ([N, K/g] each)."""
    n, k = codes.shape
    if group_size not in (32, 64, 128) or k % group_size:
        raise ValueError(f"Int4Tiles needs a group of 32, 64 or 128 that divides K ({k}), got {group_size}")
    pad = -n % TILE_N
    c = torch.cat([codes, codes.new_zeros(pad, k)]) if pad else codes
    scale = scale.to(torch.bfloat16)
    zero = zero.to(torch.bfloat16)  # [N, K/g]
    if pad:
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    nb = c.shape[0] // TILE_N
    # code of channel r, input 8t + 2i + p -> nibble i of word 2r + p of tile t
    q = c.to(torch.int32).view(nb, TILE_N, k // TILE_K, 4, 2).permute(0, 2, 1, 4, 3)  # [nb, K/8, 16, 2, 4]
    words = (q << torch.tensor([0, 4, 8, 12], dtype=torch.int32)).sum(-1).reshape(nb, k // TILE_K, 32)
    tiles = torch.stack([words & 255, words >> 8], dim=-1).to(torch.uint8).reshape(nb, k // TILE_K, 64)
    g = k // group_size
    return Int4Tiles(tiles.contiguous(), scale.view(nb, TILE_N, g).transpose(1, 2).contiguous(),
                     zero.view(nb, TILE_N, g).transpose(1, 2).contiguous(), n, group_size)


def _tile_codes(b: torch.Tensor) -> torch.Tensor:
    """Tile bytes int32 [..., 2(p), 2(byte)] (one channel's words 2r, 2r + 1 of a tile) -> codes
    [..., 4(i), 2(p)], the code of input 8t + 2i + p in nibble i of word 2r + p."""
    words = (b[..., 0] | (b[..., 1] << 8)).unsqueeze(-2)  # [..., 1, 2(p)]
    return (words >> torch.tensor([[0], [4], [8], [12]], dtype=torch.int32)) & 15  # [..., 4(i), 2(p)]


def unpack_int4_tiles(w: Int4Tiles) -> torch.Tensor:
    """Int4Tiles -> codes uint8 [Np, K]."""
    nb, kt, _ = w.tiles.shape
    q = _tile_codes(w.tiles.to(torch.int32).view(nb, kt, TILE_N, 2, 2))  # [nb, K/8, 16(r), 4(i), 2(p)]
    return q.permute(0, 2, 1, 3, 4).reshape(nb * TILE_N, kt * TILE_K).to(torch.uint8)


def _tiles_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """codes [R, K] with scale and zero float32 [R, K/g] -> w = scale * code + zero [R, K] in dtype."""
    return (codes.float() * scale.repeat_interleave(g, dim=1) + zero.repeat_interleave(g, dim=1)).to(dtype)


def _tiles_scales(w: Int4Tiles) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero as [Np, K/g] float32."""
    nb, g, _ = w.scale.shape
    return (w.scale.float().transpose(1, 2).reshape(nb * TILE_N, g),
            w.zero.float().transpose(1, 2).reshape(nb * TILE_N, g))


def pack_int4_auto(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int):
    """Int4Tiles where batchlm's AVX-512 BF16 int4 kernel runs (CPU), else torch's Int4Packed."""
    lib = cpu_native.library() if codes.device.type == "cpu" else None
    if lib is not None and lib.int4_fast and group_size in (32, 64, 128):
        return pack_int4_tiles(codes, scale, zero, group_size)
    return pack_int4(codes, scale, zero, group_size)


def _trim(y: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """[M, Np] over channels padded to a multiple of 16 -> the n real ones, in dtype."""
    if y.shape[1] != n:
        y = y[:, :n]
    return y if y.dtype == dtype else y.to(dtype)


def int4_native_mm(x: torch.Tensor, w: Int4Tiles) -> torch.Tensor:
    return _trim(cpu_native.library().int4_mm(x, w.tiles, w.scale, w.zero, w.group_size), w.n, x.dtype)


def int4_native_dequant_mm(x: torch.Tensor, w: Int4Tiles) -> torch.Tensor:
    # NOTE: for prefill chunks. int4_dequant_mm unpacks the tiles with a dozen torch ops (a 256-token
    # prompt: 543 ms of prefill, against int8's 160); gemv.c writes the weight transposed in one pass.
    dtype = x.dtype if x.dtype in cpu_native.DTYPES else torch.float32
    wt = cpu_native.library().int4_dequant_t(w.tiles, w.scale, w.zero, w.group_size, dtype)  # [K, Np]
    return _trim(torch.matmul(x.to(dtype), wt), w.n, x.dtype)


def int4_native_gemm(x: torch.Tensor, w: Int4Tiles) -> torch.Tensor:
    return cpu_native.library().int4_gemm(x, w.tiles, w.scale, w.zero, w.group_size, w.n)  # [M, n] bf16


def int4_pack_mm(x: torch.Tensor, w: Int4Packed) -> torch.Tensor:
    xb = x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)
    return _trim(torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w.packed, w.group_size, w.sz), w.n, x.dtype)


def int4_dequant_mm(x: torch.Tensor, w: Int4Packed) -> torch.Tensor:
    return F.linear(x, dequantize_int4(w, x.dtype))  # [M, N]


def int4_rows(w: Int4Packed | Int4Tiles, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized rows `rows` [T] of the weight -> [T, K] (an embedding lookup)."""
    if isinstance(w, Int4Tiles):
        kt = w.tiles.shape[1]
        blk, r = rows // TILE_N, rows % TILE_N
        b = w.tiles[blk].to(torch.int32).view(len(rows), kt, TILE_N, 2, 2)  # [T, K/8, 16(r), 2(p), 2(byte)]
        codes = _tile_codes(b[torch.arange(len(rows)), :, r]).reshape(len(rows), kt * TILE_K)  # [T, K]
        return _tiles_dequant(codes, w.scale[blk, :, r].float(), w.zero[blk, :, r].float(), w.group_size, dtype)
    k = w.packed.shape[1] * 2
    p = w.packed.view(-1, k, INT4_TILE_N // 2)  # [tiles, K, 32]
    tile, within = rows // INT4_TILE_N, rows % INT4_TILE_N
    b = p[tile, :, within % 32]  # [T, K]
    codes = torch.where((within >= 32).unsqueeze(1), b >> 4, b & 15)
    sz = w.sz[:, rows].to(dtype)  # [K/g, T, 2]
    g = w.group_size
    q = codes.to(dtype).view(len(rows), k // g, g) - 8
    return (q * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)).view(len(rows), k)


# ---- where each runs ----------------------------------------------------------
# ---- where each runs ----------------------------------------------------------
NATIVE = ("int8_native_mm", "int8_native_gemm", "int4_native_mm", "int4_native_dequant_mm",
          "int4_native_gemm")  # need cpu_native's library, CPU tensors
GEMM = ("int8_native_gemm", "int4_native_gemm")  # gemm.c's: their AVX-512 BF16 loops, bf16 activations
LAYOUT = {"int4_native_mm": Int4Tiles, "int4_native_dequant_mm": Int4Tiles, "int4_native_gemm": Int4Tiles,
          "int4_pack_mm": Int4Packed}  # the packed form each reads


def available(fn, device: torch.device, packed=None, dtype: torch.dtype | None = None) -> bool:
    """Whether kernel `fn` runs here on a weight packed as `packed` (None: any form) in a model
    computing in `dtype` (None: any). gemm.c's kernels take x in bfloat16, so they are offered
    to bfloat16 models only: a float32 model's activations are not rounded behind its back."""
    name = fn.__name__
    if packed is not None and name in LAYOUT and not isinstance(packed, LAYOUT[name]):
        return False
    if name in NATIVE:
        lib = cpu_native.library() if device.type == "cpu" else None
        if lib is None:
            return False
        if name in GEMM:
            return lib.gemm_fast and dtype in (None, torch.bfloat16)
    return True


# ---- fp8 (CUDA) -----------------------------------------------------------------
def pack_fp8(weight: torch.Tensor) -> Fp8Packed:
    """weight float [N, K] -> e4m3 codes with one scale per output channel."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)  # [N]
    return Fp8Packed((w / scale.unsqueeze(1)).to(torch.float8_e4m3fn), scale)


def dequantize_fp8(w: Fp8Packed) -> torch.Tensor:
    return w.codes.float() * w.scale.unsqueeze(1)


def fp8_scaled_mm(x: torch.Tensor, w: Fp8Packed) -> torch.Tensor:
    fmax = torch.finfo(torch.float8_e4m3fn).max
    x32 = x.float()
    sx = (x32.abs().amax(dim=1, keepdim=True) / fmax).clamp_(min=1e-12)  # [M, 1]
    xq = (x32 / sx).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w.codes.t(), scale_a=sx, scale_b=w.scale.unsqueeze(0),
                            out_dtype=x.dtype)
