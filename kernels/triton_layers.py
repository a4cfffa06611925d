"""Triton kernels for the small per-layer ops: fused residual add + RMSNorm,
rotary embedding, SiLU-and-multiply.

Contract
--------
Each matches a PyTorch reference in batchlm.models (the one place each rule
lives; the tests compare against it), within float rounding:
- `add_rms_norm(x, residual, weight, eps, out)`: residual <- x + residual (in
  place, x's dtype), then out = RMSNorm(residual) as models.llama.RMSNorm
  computes it (float32 statistics, cast back, then times weight). With
  residual None: out = RMSNorm(x). x, residual, out: [N, dim].
- `rotary(x, positions, cos, sin, out)`: models.rope.RotaryEmbedding.apply
  with its half-width tables cos, sin [max_positions, rot_dim / 2] (any rope
  type: the type only changes the tables); x, out [T, heads, D]; features
  past rot_dim are copied.
- `silu_and_mul(gate_up, out)`: silu(gate) * up for gate_up [N, 2I] = [gate |
  up] (models.llama.MLP) -> out [N, I].
Outputs are written whole. Rows must have a unit last stride. On the CPU
they run only in Triton's interpreter (see triton_attention.interpreter_enabled).

`TritonLayerKernels` is what the models call (batchlm.models.llama, when
batchlm.kernels.dispatch.get_layer_kernels gives one): the same three ops
allocating their outputs, on tensors of any leading shape.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from batchlm.kernels.triton_attention import _TRITON_DTYPES, LaunchConfig


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, eps, stride_x, stride_r, stride_o,
                         DIM: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # grid (N,): one row.
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK)
    cm = c < DIM
    # NOTE: arithmetic in float32, rounded to the activation dtype where
    # torch rounds (each bf16 op of torch is a float32 op rounded); Triton
    # 3.9's interpreter also gets bf16 arithmetic wrong.
    x32 = tl.load(x_ptr + row * stride_x + c, mask=cm, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = (x32 + tl.load(res_ptr + row * stride_r + c, mask=cm, other=0.0).to(tl.float32))
        x = x.to(res_ptr.dtype.element_ty)  # h = h + x, in the activation dtype
        tl.store(res_ptr + row * stride_r + c, x, mask=cm)
        x32 = x.to(tl.float32)
    inv = tl.rsqrt(eps + tl.sum(x32 * x32, 0) / DIM)
    normed = (x32 * inv).to(out_ptr.dtype.element_ty).to(tl.float32)  # cast back, then scale (as HF)
    w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (normed * w).to(out_ptr.dtype.element_ty), mask=cm)


@triton.jit
def _rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, stride_xt, stride_xh, stride_ot,
                   stride_oh, D: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    # grid (T, cdiv(heads, BLOCK_H)): BLOCK_H heads of one token share its cos/sin row.
    # [x1 | x2 | rest] -> [x1 c - x2 s | x2 c + x1 s | rest]
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = h < num_heads
    i = tl.arange(0, BLOCK_HALF)
    im = i < HALF
    m = hm[:, None] & im[None, :]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * HALF + i, mask=im, other=0.0).to(tl.float32)[None, :]
    s = tl.load(sin_ptr + pos * HALF + i, mask=im, other=0.0).to(tl.float32)[None, :]
    src = x_ptr + t * stride_xt + h[:, None] * stride_xh
    dst = out_ptr + t * stride_ot + h[:, None] * stride_oh
    x1 = tl.load(src + i[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(dst + i[None, :], (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF + i[None, :], (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=m)
    if 2 * HALF < D:  # partial rotary: the rest is copied
        r = 2 * HALF + tl.arange(0, BLOCK_D)
        rm = hm[:, None] & (r < D)[None, :]
        tl.store(dst + r[None, :], tl.load(src + r[None, :], mask=rm), mask=rm)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    # grid (N, cdiv(INTER, BLOCK))
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cm = c < INTER
    g32 = tl.load(x_ptr + row * stride_x + c, mask=cm, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + c, mask=cm, other=0.0).to(tl.float32)
    # F.silu rounded to the activation dtype, then the product rounded (as torch)
    act = (g32 / (1.0 + tl.exp(-g32))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + c, (act * up).to(out_ptr.dtype.element_ty), mask=cm)


SILU_BLOCK = 1024


def add_rms_norm(x, residual, weight, eps: float, out):
    N, dim = x.shape
    _add_rms_norm_kernel[(N,)](x, residual if residual is not None else x, weight, out, eps, x.stride(0),
                               residual.stride(0) if residual is not None else 0, out.stride(0),
                               **_norm_constexprs(dim, residual is not None))


# Heads per rotary program: one program per (token, head) cost more than
# torch's elementwise ops (65.5 vs 47.6 us at 4096 tokens x 12 heads on an H100).
ROTARY_BLOCK_H = 4


def rotary(x, positions, cos, sin, out):
    T, heads, D = x.shape
    _rotary_kernel[(T, triton.cdiv(heads, ROTARY_BLOCK_H))](
        x, positions, cos, sin, out, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        **_rotary_constexprs(D, cos.shape[1]))


def silu_and_mul(gate_up, out):
    N, inter = out.shape
    _silu_and_mul_kernel[(N, triton.cdiv(inter, SILU_BLOCK))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                               **_silu_constexprs(inter))


def _norm_constexprs(dim, has_residual):
    return dict(DIM=dim, BLOCK=triton.next_power_of_2(dim), HAS_RESIDUAL=has_residual)


def _rotary_constexprs(D, half):
    return dict(D=D, HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(D),
                BLOCK_H=ROTARY_BLOCK_H)


def _silu_constexprs(inter):
    return dict(INTER=inter, BLOCK=min(SILU_BLOCK, triton.next_power_of_2(inter)))


def launch_configs(hidden: int, head_dim: int, rot_dim: int, intermediate: int,
                   dtype: torch.dtype) -> list[LaunchConfig]:
    """Every kernel variant the functions above run for these shapes."""
    act = "*" + _TRITON_DTYPES[dtype]

    def cfg(kernel, types, consts, warps=4):
        assert len(types) + len(consts) == len(kernel.arg_names), f"{kernel.__name__}: signature out of date"
        sig = dict(zip(kernel.arg_names, types))
        sig.update({n: "constexpr" for n in consts})
        return LaunchConfig(kernel, sig, consts, warps)

    out = [cfg(_add_rms_norm_kernel, [act, act, act, act, "fp32", "i32", "i32", "i32"],
               _norm_constexprs(hidden, has)) for has in (True, False)]
    out.append(cfg(_rotary_kernel, [act, "*i64", act, act, act, "i32", "i32", "i32", "i32", "i32"],
                   _rotary_constexprs(head_dim, rot_dim // 2)))
    out.append(cfg(_silu_and_mul_kernel, [act, act, "i32", "i32"], _silu_constexprs(intermediate)))
    return out


class TritonLayerKernels:
    """The layer kernels as the models call them (outputs allocated here)."""

    name = "triton"

    @staticmethod
    def rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual): residual [N, dim] is updated
        in place; with residual None, (RMSNorm(x), x). x: [..., dim]."""
        dim = x.shape[-1]
        x2 = x.reshape(-1, dim)  # [N, dim] (a copy only for a view that cannot be flattened)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        add_rms_norm(x2, residual, weight, eps, out)
        return out.view(x.shape), (x if residual is None else residual)

    @staticmethod
    def rotary(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] (unit last stride) rotated at positions [T] int64 -> a fresh [T, heads, D]."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        rotary(x, positions, cos, sin, out)
        return out

    @staticmethod
    def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [N, 2I] -> silu(gate) * up [N, I]."""
        if gate_up.stride(-1) != 1:
            gate_up = gate_up.contiguous()
        out = torch.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype, device=gate_up.device)
        silu_and_mul(gate_up, out)
        return out
