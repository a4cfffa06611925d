"""Quantized stand-ins for nn.Linear and nn.Embedding, and how weights reach them.

Contract
--------
`QuantLinear(in_features, out_features, bias, qcfg, dtype, name)` and
`QuantEmbedding(num_embeddings, dim, qcfg, dtype, name)` are built in place
of the float modules (on any device, meta included) before weights load.
They are *weight sinks*: the model's `load_weights` hands them
`take_weight(rows, tensor_or_groupquant)` for each checkpoint tensor (or row
range of a fused layer, e.g. q/k/v into qkv_proj), and each part is turned
into the target format at once, so a float checkpoint never exists in full
precision as a whole; only one tensor at a time. `missing()` names row ranges
not yet received. `finish(device)` joins the parts and packs them for the
kernels (batchlm.kernels.quant_matmul); from then on the module holds only
the packed weight (registered as buffers, so `buffers()` counts its bytes).

Target formats: int8 and int8_dynamic: symmetric int8, one scale per output
channel; int4: asymmetric, `qcfg.group_size` (None: the group of a 4-bit
checkpoint part when one arrives first, else 64; a group that does not
divide a layer's inputs falls back, for that layer, to the largest of 32/64/128
below it that does); fp8: e4m3, one scale per
output channel (CUDA only). A part in another format (e.g. GGUF Q8_0 blocks
of 32 for int8, Q6_K for int4) is dequantized and quantized again, one part
at a time.

`forward(x [..., K]) -> [..., N]` in the compute dtype picks its kernel from
`kernels`: a list of (max_rows, kernel) set by batchlm.quantization.plan;
rows beyond the last bound use the last kernel.

`QuantEmbedding.forward(ids [T]) -> [T, dim]` dequantizes the rows it needs;
`as_linear()` returns a QuantLinear that shares its packed table (tied LM head).
"""
from __future__ import annotations

import torch
from torch import nn

from batchlm.kernels import quant_matmul as qm
from batchlm.quantization.config import DEFAULT_INT4_GROUP, INT4_GROUPS, QuantConfig
from batchlm.quantization.groupquant import GroupQuant, quantize_int4, quantize_int8
from batchlm.quantization.plan import CANDIDATES, UNBOUNDED


class _QuantWeight(nn.Module):
    """Shared part of QuantLinear/QuantEmbedding: receive parts, pack, hold buffers."""

    def __init__(self, out_features: int, in_features: int, qcfg: QuantConfig, dtype: torch.dtype, name: str):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.qcfg, self.dtype, self.name = qcfg, dtype, name
        self.group_size = qcfg.group_size
        self._parts: dict[int, tuple[int, GroupQuant | torch.Tensor]] = {}  # row start -> (row end, part)
        self.packed = None  # kernels' packed form, after finish()

    # ---- loading -------------------------------------------------------------
    def take_weight(self, rows: tuple[int, int] | None, w) -> None:
        start, end = rows or (0, self.out_features)
        k = w.shape[1]
        if (end - start, k) != (w.shape[0], self.in_features):
            raise ValueError(f"weight for {self.name} rows {start}:{end}: shape {tuple(w.shape)}, "
                             f"expected {(end - start, self.in_features)}")
        self._parts[start] = (end, self._to_target(w))

    def _to_target(self, w):
        m = self.qcfg.method
        if m == "fp8":
            return w.dequantize() if isinstance(w, GroupQuant) else w.detach().float()
        if m in ("int8", "int8_dynamic"):
            if isinstance(w, GroupQuant) and w.bits == 8 and w.group_size == self.in_features:
                return w
            return quantize_int8(w.dequantize() if isinstance(w, GroupQuant) else w)
        if self.group_size is None:  # int4: keep a 4-bit checkpoint's own groups
            ok = isinstance(w, GroupQuant) and w.bits == 4 and self.in_features % w.group_size == 0
            self.group_size = w.group_size if ok else DEFAULT_INT4_GROUP
        if self.in_features % self.group_size:
            # NOTE: e.g. SmolLM2's 576 inputs with group 128: the largest group
            # below it that divides K (576 -> 64); the kernel has no ragged groups.
            fits = [g for g in INT4_GROUPS if g < self.group_size and self.in_features % g == 0]
            if not fits:
                raise ValueError(f"int4 needs the {self.in_features} inputs of {self.name} to be a "
                                 f"multiple of one of {INT4_GROUPS}")
            self.group_size = fits[-1]
        if isinstance(w, GroupQuant) and w.bits == 4 and w.group_size == self.group_size:
            return w
        return quantize_int4(w.dequantize() if isinstance(w, GroupQuant) else w, self.group_size)

    def missing(self) -> list[str]:
        out, row = [], 0
        for start in sorted(self._parts):
            if start > row:
                out.append(f"{self.name}[{row}:{start}]")
            row = max(row, self._parts[start][0])
        if row < self.out_features and self.packed is None:
            out.append(f"{self.name}[{row}:{self.out_features}]")
        return out

    @torch.no_grad()
    def finish(self, device: torch.device) -> None:
        if self.packed is not None:
            return
        if self.missing():
            raise ValueError(f"checkpoint is missing weights: {', '.join(self.missing())}")
        parts = [self._parts[s][1] for s in sorted(self._parts)]
        self._parts = {}
        m = self.qcfg.method
        if m == "fp8":
            if device.type != "cuda":
                raise ValueError("quantization='fp8' needs a CUDA GPU (torch._scaled_mm); "
                                 "on the CPU use 'int8' or 'int4'")
            self.packed = qm.pack_fp8(torch.cat(parts).to(device))
        else:
            codes = torch.cat([p.codes for p in parts]).to(device)
            scale = torch.cat([p.scale for p in parts]).to(device)
            if m == "int4":
                zero = torch.cat([p.zero for p in parts]).to(device)
                self.packed = qm.pack_int4_auto(codes, scale, zero, self.group_size)
            else:
                self.packed = qm.pack_int8(codes, scale[:, 0], self.dtype)
        self._register_packed()

    def _register_packed(self) -> None:
        """The packed tensors as buffers `q_<field>` (so `buffers()` counts them)."""
        for field, value in vars(self.packed).items():
            if isinstance(value, torch.Tensor):
                self.register_buffer(f"q_{field}", value, persistent=False)


class QuantLinear(_QuantWeight):
    def __init__(self, in_features: int, out_features: int, bias: bool, qcfg: QuantConfig,
                 dtype: torch.dtype, name: str):
        super().__init__(out_features, in_features, qcfg, dtype, name)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.kernels: list[tuple[int, object]] = [(UNBOUNDED, CANDIDATES[qcfg.method][-1])]  # until plan_kernels

    @classmethod
    def sharing(cls, source: "_QuantWeight", name: str) -> "QuantLinear":
        lin = cls(source.in_features, source.out_features, False, source.qcfg, source.dtype, name)
        lin.group_size, lin.packed = source.group_size, source.packed
        lin._register_packed()
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.dim() == 2  # the models' [T, K] (no reshape/view ops: 2 of ~60 per layer each)
        x2 = x if flat else x.reshape(-1, self.in_features)  # [M, K]
        m = x2.shape[0]
        kernel = self.kernels[-1][1]
        for bound, fn in self.kernels:
            if m <= bound:
                kernel = fn
                break
        y = kernel(x2, self.packed)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y if flat else y.view(*x.shape[:-1], self.out_features)


class QuantEmbedding(_QuantWeight):
    def __init__(self, num_embeddings: int, dim: int, qcfg: QuantConfig, dtype: torch.dtype, name: str):
        super().__init__(num_embeddings, dim, qcfg, dtype, name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        p = self.packed
        if isinstance(p, (qm.Int4Packed, qm.Int4Tiles)):
            return qm.int4_rows(p, ids, self.dtype)  # [T, dim]
        return (p.codes[ids].to(self.dtype) * p.scale[ids].unsqueeze(1).to(self.dtype))

    def as_linear(self) -> QuantLinear:
        return QuantLinear.sharing(self, self.name + " (LM head)")
