"""GroupQuant: one quantized weight matrix in batchlm's canonical form.

Contract
--------
A `GroupQuant` holds the integer codes of a `[N, K]` weight (N output rows, K
inputs) and one scale per group of `group_size` consecutive inputs of a row:

- 8-bit (`bits=8`): `codes` int8 `[N, K]`, symmetric: `w = scale * code`;
  `zero` is None. Per-output-channel is `group_size == K`.
- 4-bit (`bits=4`): `codes` uint8 `[N, K]` holding 0..15 (one code per byte
  here; packing two per byte is the kernel layout's business), asymmetric:
  `w = scale * code + zero`. A symmetric 4-bit format (GGUF Q4_0,
  `w = d * (code - 8)`) is `scale = d, zero = -8 d`.

`scale` and `zero` are float32 `[N, K // group_size]`. K must be a multiple
of `group_size`.

`dequantize() -> float32 [N, K]` is the reference every kernel is checked
against. `quantize_int8(w, group_size=None)` (symmetric, round to nearest,
codes in -127..127) and `quantize_int4(w, group_size)` (asymmetric min/max
per group, codes 0..15) build one from a float weight.

It knows nothing about modules, kernels or files.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupQuant:
    bits: int
    group_size: int
    codes: torch.Tensor  # [N, K] int8 (bits=8) or uint8 0..15 (bits=4)
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor | None = None  # [N, K // group_size] float32 (bits=4 only)

    def __post_init__(self):
        n, k = self.codes.shape
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if k % self.group_size:
            raise ValueError(f"K={k} is not a multiple of group_size={self.group_size}")
        want = (n, k // self.group_size)
        if tuple(self.scale.shape) != want:
            raise ValueError(f"scale has shape {tuple(self.scale.shape)}, expected {want}")
        if self.bits == 4 and (self.zero is None or tuple(self.zero.shape) != want):
            raise ValueError(f"4-bit weights need zero of shape {want}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.group_size
        w = self.codes.float().view(n, k // g, g) * self.scale.float().unsqueeze(-1)
        if self.zero is not None:
            w = w + self.zero.float().unsqueeze(-1)
        return w.view(n, k)  # [N, K] float32


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> GroupQuant:
    """Symmetric int8; per output channel unless `group_size` is given."""
    w = weight.detach().float()
    n, k = w.shape
    g = group_size or k
    wg = w.view(n, k // g, g)
    scale = (wg.abs().amax(-1) / 127.0).clamp(min=1e-12)  # [N, K/g]
    codes = torch.round(wg / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(n, k)
    return GroupQuant(8, g, codes, scale)


def quantize_int4(weight: torch.Tensor, group_size: int) -> GroupQuant:
    """Asymmetric 4-bit, min/max per group of `group_size` inputs."""
    w = weight.detach().float()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    wg = w.view(n, k // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)  # [N, K/g]
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    codes = torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
    return GroupQuant(4, group_size, codes.to(torch.uint8).view(n, k), scale, lo)
