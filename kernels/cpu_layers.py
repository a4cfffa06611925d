"""The native CPU kernels of a decode step's small ops (kernels/native/layers.c),
behind the interfaces the models already call.

Contract
--------
`NativePagedAttention` is kernels/attention.py's paged-attention contract
(a TorchPagedAttention, same cache layout): a step of decodes writes the new
keys and values and attends in one native call (layers.c's
bl_paged_attention), reading each sequence's blocks where they lie in the
cache (no gather); the decodes of a mixed step are attended natively after
the reference's write. Prompt chunks stay on the reference (its blocked
matmuls: a 2048-token prompt took 1.4 s there, 5.1 s through the native
per-row loop, default model, bf16, 2 threads). Other inputs (fp8 caches,
other dtypes, non-CPU tensors) go to the reference.

`NativeLayerKernels` is kernels/triton_layers.py's `TritonLayerKernels`
interface (`rms_norm`, `rotary`, `silu_and_mul`, outputs allocated) over
layers.c, for models computing in float32 or bfloat16 on the CPU (dispatch
gives it to no other); a tensor of another dtype or device raises TypeError.

Both need `cpu_native.library()`; kernels/dispatch.py picks them on the CPU
when it built (attention_backend "auto" or "native").
"""
from __future__ import annotations

import torch

from batchlm.kernels import cpu_native
from batchlm.kernels.attention import TorchPagedAttention

NATIVE_DTYPES = cpu_native.DTYPES


def _rows_ok(t: torch.Tensor) -> bool:
    """[T, heads, D] rows the kernels read: D contiguous, heads D apart."""
    return t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


class NativePagedAttention(TorchPagedAttention):
    name = "native"

    def __init__(self, lib: cpu_native.NativeLib):
        super().__init__()
        self.lib = lib

    @staticmethod
    def _step_ok(meta) -> bool:
        """Whether this step's metadata is what layers.c reads (once per step: meta.derived)."""
        ok = meta.derived.get("native")
        if ok is None:
            t = meta.block_tables
            ok = meta.derived["native"] = (t.is_cpu and t.dtype == torch.int64 and t.stride(1) == 1 and all(
                x.dtype == torch.int64 and x.is_contiguous()
                for x in (meta.seq_lens, meta.query_start_loc, meta.slot_mapping)))
        return ok

    def _native(self, q, k_cache, meta) -> bool:
        # NOTE: a few attribute reads: this runs once per layer and step.
        return (q.dtype in NATIVE_DTYPES and k_cache.dtype in NATIVE_DTYPES and q.is_cpu and _rows_ok(q)
                and self._step_ok(meta))

    def forward(self, q, k, v, k_cache, v_cache, meta, scale: float, window: int | None = None):
        if (meta.num_decodes == q.shape[0] and self._native(q, k_cache, meta) and k.dtype == q.dtype
                and v.dtype == q.dtype and _rows_ok(k) and _rows_ok(v)):
            out = torch.empty(q.shape, dtype=q.dtype)  # decodes only: write and attend in one call
            self.lib.paged_attention(q, k, v, meta.slot_mapping, k_cache, v_cache, meta.block_tables,
                                     meta.seq_lens, meta.query_start_loc, out, scale, window)
            return out
        return super().forward(q, k, v, k_cache, v_cache, meta, scale, window)

    def _decode(self, q, k_cache, v_cache, meta, scale, window):
        # The decodes of a mixed step, after the reference wrote every key and value.
        if not self._native(q, k_cache, meta):
            return super()._decode(q, k_cache, v_cache, meta, scale, window)
        nd = q.shape[0]
        out = torch.empty(q.shape, dtype=q.dtype)
        self.lib.paged_attention(q, None, None, None, k_cache, v_cache, meta.block_tables, meta.seq_lens[:nd],
                                 meta.query_start_loc[:nd + 1], out, scale, window)
        return out


class NativeLayerKernels:
    name = "native"

    def __init__(self, lib: cpu_native.NativeLib):
        self.lib = lib

    @staticmethod
    def _refuse(*ts: torch.Tensor):
        raise TypeError("the native layer kernels take float32 or bfloat16 CPU tensors of one dtype, with "
                        "unit last strides, got " + ", ".join(f"{t.dtype} on {t.device}" for t in ts))

    # NOTE: each of these runs once or twice per layer and step; the checks are attribute reads
    # (a decode step of the default model makes ~120 of these calls).
    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual): residual [N, dim] updated in place; with residual
        None, (RMSNorm(x), x). x: [..., dim]."""
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        dt = x2.dtype
        if (dt not in NATIVE_DTYPES or weight.dtype != dt or not x2.is_cpu or weight.stride(-1) != 1
                or (residual is not None and (residual.dtype != dt or residual.stride(-1) != 1))):
            self._refuse(x2, weight, *(() if residual is None else (residual,)))
        out = torch.empty(x2.shape, dtype=dt)
        self.lib.add_rms_norm(x2, residual, weight, out, eps)
        return (out if x2 is x else out.view(x.shape)), (x if residual is None else residual)

    def rotary(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated at positions [T] int64 (half-width tables, contiguous) -> a fresh
        [T, heads, D]."""
        if not _rows_ok(x):
            x = x.contiguous()
        dt = x.dtype
        if (dt not in NATIVE_DTYPES or cos.dtype != dt or sin.dtype != dt or not x.is_cpu
                or positions.dtype != torch.int64 or not (positions.is_contiguous() and cos.is_contiguous()
                                                           and sin.is_contiguous())):
            self._refuse(x, cos, sin, positions)
        out = torch.empty(x.shape, dtype=dt)
        self.lib.rotary(x, positions, cos, sin, out)
        return out

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [N, 2I] -> silu(gate) * up [N, I]."""
        if gate_up.stride(-1) != 1:
            gate_up = gate_up.contiguous()
        if gate_up.dtype not in NATIVE_DTYPES or not gate_up.is_cpu or gate_up.dim() != 2:
            self._refuse(gate_up)
        out = torch.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=gate_up.dtype)
        self.lib.silu_mul(gate_up, out)
        return out
