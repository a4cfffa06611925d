"""Rotary position embeddings as a precomputed cos/sin table indexed by position.

Contract
--------
`RotaryEmbedding(hf_config, dtype)` reads the rope settings of an HF config
(transformers 5 `rope_parameters`, or the older `rope_theta` + `rope_scaling`)
and builds `cos, sin: [max_positions, rot_dim / 2]` once, on the CPU, in
`dtype`. `lookup(positions [T]) -> (cos, sin) [T, 1, rot_dim]` (once per
step; cos = [cos | cos], sin = [-sin | sin] over the two halves), then
`apply(x [T, heads, D], cos, sin)` rotates the first `rot_dim` features of
every head (the "rotate half" convention of HF Llama), with no Python loop
over tokens; `forward(positions, q, k)` does both.

`apply` is `x * cos + roll(x, rot_dim / 2) * sin`: the same products and sums
as HF's `x * cos + rotate_half(x) * sin`, so bitwise equal, in 4 ops instead
of the 9 of slicing the halves apart and concatenating them (measured on one
decode token's [1, 12, 64]: ~2x faster; a step runs it once per layer).

Frequencies come from transformers' `ROPE_INIT_FUNCTIONS` (linear, dynamic,
yarn, longrope, llama3, ...), so each rope type matches HF exactly, including
the `attention_scaling` factor folded into cos/sin.

NOTE: the table is a plain attribute, not a buffer: the loader builds modules
on the meta device and `to_empty()`s them, which would wipe buffers. It moves
itself to the device of `positions` on first use.
NOTE: "dynamic" NTK scaling is evaluated once, at `max_position_embeddings`
(i.e. unscaled inside the original context); HF re-derives it per batch from
the longest sequence, which a per-token table cannot do.
"""
from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config) -> dict:
    """The rope settings of `config` as one dict with at least rope_theta and rope_type."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        out = dict(params)
    else:  # transformers 4 style
        out = dict(getattr(config, "rope_scaling", None) or {})
        out["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    out["rope_type"] = out.get("rope_type", out.get("type", "default")) or "default"
    return out


def _inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config)
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        base = params["rope_theta"]
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; known: "
                         f"default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device=torch.device("cpu"))
    return inv.float(), float(scaling)


class RotaryEmbedding(nn.Module):
    def __init__(self, config, head_dim: int, dtype: torch.dtype, max_positions: int | None = None):
        super().__init__()
        # NOTE: force CPU even inside a `torch.device("meta")` construction context.
        with torch.device("cpu"):
            inv_freq, scaling = _inv_freq(config, head_dim)  # [rot_dim / 2]
            n = max_positions or getattr(config, "max_position_embeddings", None) or 8192
            freqs = torch.outer(torch.arange(n, dtype=torch.int64).float(), inv_freq)  # [n, rot_dim/2]
            self.cos = (freqs.cos() * scaling).to(dtype)
            self.sin = (freqs.sin() * scaling).to(dtype)
        self.rot_dim = 2 * inv_freq.numel()
        self.head_dim = head_dim

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The half-width tables cos, sin [max_positions, rot_dim / 2] on `device`
        (what a rotary kernel reads: batchlm.kernels.triton_layers)."""
        if self.cos.device != device:
            self.cos, self.sin = self.cos.to(device), self.sin.to(device)
        return self.cos, self.sin

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, rot_dim] for positions [T] (see the contract); once per forward."""
        if self.cos.device != positions.device:
            self.cos = self.cos.to(positions.device)
            self.sin = self.sin.to(positions.device)
        cos = self.cos[positions]  # [T, rot_dim / 2]
        sin = self.sin[positions]
        # NOTE: the tables stay half width (a 128k-position model's would
        # double); widening them here costs 3 ops per step, not per layer.
        return torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, heads, D]; cos, sin: [T, 1, rot_dim] from lookup
        half = self.rot_dim // 2
        if self.rot_dim == self.head_dim:
            # roll(x, half) = [x2 | x1]: x * cos + roll * sin = [x1 c - x2 s | x2 c + x1 s]
            return torch.mul(x, cos).add_(x.roll(half, -1).mul_(sin))  # [T, heads, D], fresh
        r = x[..., :self.rot_dim]
        rotated = torch.mul(r, cos).add_(r.roll(half, -1).mul_(sin))
        return torch.cat((rotated, x[..., self.rot_dim:]), dim=-1)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.lookup(positions)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)
