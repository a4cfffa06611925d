"""Decoder-only Llama-family models over a flat batch of tokens: Llama (1/2/3,
SmolLM2), Mistral, Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Contract
--------
`Cls(hf_config, attention_backend, dtype, layer_kernels=None)`; the backend
follows batchlm.kernels.attention (`forward(q, k, v, k_cache, v_cache, meta,
scale)`) and is held by the module, never looked up globally. layer_kernels
(from batchlm.kernels.get_layer_kernels): None runs the PyTorch code below
(the CPU path); otherwise its fused ops run instead (`rms_norm(x, residual,
weight, eps)` with the residual add folded in, `rotary`, `silu_and_mul`:
kernels/triton_layers.TritonLayerKernels), and the residual stream is carried
beside the hidden states from layer to layer (`_forward_kernels`).
- `forward(input_ids [T] int64, positions [T] int64, kv_caches, meta) -> hidden
  [T, hidden_size]` (after the final norm); `kv_caches[i] = (k_cache, v_cache)`
  of layer i, each `[num_blocks, block_size, num_kv_heads, head_dim]`.
- `compute_logits(hidden [N, hidden_size]) -> [N, vocab] float32`.
- `load_weights(named_tensors)` takes HF checkpoint names (`model.layers.0.
  self_attn.q_proj.weight`, ...) with tensors or quantized GroupQuant parts (a
  module with `take_weight`, e.g. a QuantLinear, receives its own; others are
  dequantized), fuses q/k/v into `qkv_proj` and gate/up into
  `gate_up_proj`, skips `lm_head.weight` when embeddings are tied, and raises
  if a parameter is left unloaded.

It knows nothing about requests, sampling or how the cache blocks are chosen.

Sliding-window attention follows transformers: Mistral applies
`config.sliding_window` to every layer; Qwen2/Qwen3 to the layers that
`config.layer_types` marks "sliding_attention" (none unless use_sliding_window).
The cache still keeps every block of a sequence (no out-of-window freeing).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from batchlm.models.rope import RotaryEmbedding

class RMSNorm(nn.Module):
    """HF Llama RMSNorm: normalize in float32, cast back, then scale.

    `forward(x [..., dim]) -> [..., dim]` in x's dtype, bitwise equal to
    transformers' `weight * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`
    (aten's mean is sum / dim, as here).

    NOTE: six small ops (seven below float32), no Python scalars. F.rms_norm is a composite on the
    CPU (pow, mean = sum + div_, add_, rsqrt, mul, mul, type_as, with each
    Python scalar wrapped into a tensor): 2x the time of this on a [1, 576]
    row (measured ~14 vs ~7 us; a decode step runs 61 of them). eps and dim
    live in 0-d float32 tensors, moved to x's device on first use (plain
    attributes, not buffers: see the NOTE in rope.py).
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        with torch.device("cpu"):  # even inside a meta-device construction
            self._eps = torch.tensor(eps, dtype=torch.float32)
            self._dim = torch.tensor(float(dim), dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._eps.device != x.device:
            self._eps, self._dim = self._eps.to(x.device), self._dim.to(x.device)
        x32 = x if x.dtype == torch.float32 else x.float()  # (an op even when a no-op)
        # eps + sum(x^2) / dim, then 1 / sqrt: [..., 1]
        inv = torch.addcdiv(self._eps, x32.square().sum(-1, keepdim=True), self._dim).rsqrt_()
        if x32 is x:
            out = x32 * inv  # a fresh tensor: scaled in place below
        else:  # computed in float32 and rounded once on store, as mul then .to(): one op fewer
            out = torch.mul(x32, inv, out=torch.empty_like(x))
        return out.mul_(self.weight)

    def fused(self, kernels, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The layer-kernels path: (RMSNorm(x + residual), x + residual), the residual updated in place."""
        return kernels.rms_norm(x, residual, self.weight, self.eps)


def sliding_windows(config) -> list[int | None]:
    """The attention window of each layer (None: full causal attention)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    n = config.num_hidden_layers
    if not window:
        return [None] * n
    if types is None:
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    def __init__(self, config, attention_backend, qkv_bias: bool, o_bias: bool, qk_norm: bool,
                 rotary: RotaryEmbedding, window: int | None = None):
        super().__init__()
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = rotary  # shared by all layers
        self.attn = attention_backend

    def forward(self, x, rope, kv_cache, meta, kernels=None):
        # rope: (cos, sin) from RotaryEmbedding.lookup; with kernels: (positions, cos table, sin table)
        T = x.shape[0]
        H, KVH = self.num_heads, self.num_kv_heads
        heads = self.qkv_proj(x).view(T, H + 2 * KVH, self.head_dim)  # [T, H + 2 KVH, D]
        qk, v = heads.split([H + KVH, KVH], dim=1)  # [T, H + KVH, D], [T, KVH, D]
        if self.q_norm is not None:
            q, k = qk.split([H, KVH], dim=1)
            if kernels is None:
                qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)  # [T, H + KVH, D]
            else:
                qk = torch.cat((self.q_norm.fused(kernels, q)[0], self.k_norm.fused(kernels, k)[0]), dim=1)
        # One rotary pass over queries and keys together.
        rotated = self.rotary.apply(qk, *rope) if kernels is None else kernels.rotary(qk, *rope)
        q, k = rotated.split([H, KVH], dim=1)  # [T, H, D], [T, KVH, D]
        out = self.attn.forward(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale, self.window)  # [T, H, D]
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        from transformers.activations import ACT2FN

        bias = bool(getattr(config, "mlp_bias", False))
        self.inter = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * self.inter, bias=bias)
        self.down_proj = nn.Linear(self.inter, config.hidden_size, bias=bias)
        act = getattr(config, "hidden_act", "silu")
        self.act = F.silu if act == "silu" else ACT2FN[act]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)  # [T, inter] each
        return self.down_proj(self.act(gate) * up)

    def forward_kernels(self, x, kernels):
        gate_up = self.gate_up_proj(x)  # [T, 2 inter]
        if self.act is F.silu:
            return self.down_proj(kernels.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.inter, dim=-1)
        return self.down_proj(self.act(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, attention_backend, rotary, qkv_bias, o_bias, qk_norm, window):
        super().__init__()
        self.self_attn = Attention(config, attention_backend, qkv_bias, o_bias, qk_norm, rotary, window)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h, rope, kv_cache, meta):
        h = h + self.self_attn(self.input_layernorm(h), rope, kv_cache, meta)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_kernels(self, x, residual, rope, kv_cache, meta, kernels):
        """x: the previous layer's MLP output (the embeddings, with residual None,
        for the first layer) -> (this layer's MLP output, the residual stream)."""
        h, residual = self.input_layernorm.fused(kernels, x, residual)  # residual += x
        a = self.self_attn(h, rope, kv_cache, meta, kernels)
        h, residual = self.post_attention_layernorm.fused(kernels, a, residual)  # residual += a
        return self.mlp.forward_kernels(h, kernels), residual


class LlamaModel(nn.Module):
    def __init__(self, config, attention_backend, dtype, qkv_bias, o_bias, qk_norm, layer_kernels=None):
        super().__init__()
        self.kernels = layer_kernels
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # NOTE: one table shared by every layer (it holds no parameters or buffers).
        rotary = RotaryEmbedding(config, head_dim_of(config), dtype)
        self.rotary = rotary
        self.layers = nn.ModuleList(
            DecoderLayer(config, attention_backend, rotary, qkv_bias, o_bias, qk_norm, window)
            for window in sliding_windows(config))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta):
        if self.kernels is not None:
            return self._forward_kernels(input_ids, positions, kv_caches, meta)
        h = self.embed_tokens(input_ids)  # [T, hidden]
        rope = self.rotary.lookup(positions)  # cos, sin: [T, 1, rot_dim / 2]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, rope, kv_cache, meta)
        return self.norm(h)

    def _forward_kernels(self, input_ids, positions, kv_caches, meta):
        # NOTE: the same sums in the same order as forward (h + attn, h + mlp),
        # each rounded to the activation dtype; the kernels fold them into the norms.
        x = self.embed_tokens(input_ids)  # [T, hidden]; becomes the residual stream (updated in place)
        rope = (positions, *self.rotary.tables(positions.device))  # tables: [max_positions, rot_dim / 2]
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer.forward_kernels(x, residual, rope, kv_cache, meta, self.kernels)
        return self.norm.fused(self.kernels, x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # Per-family switches (subclasses override).
    qk_norm = False

    def qkv_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def o_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def __init__(self, config, attention_backend, dtype: torch.dtype = torch.float32, layer_kernels=None):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = LlamaModel(config, attention_backend, dtype, self.qkv_bias(config),
                                self.o_bias(config), self.qk_norm, layer_kernels)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.to(dtype)

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, meta):
        return self.model(input_ids, positions, kv_caches, meta)  # [T, hidden]

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:  # tied, float: the embedding table is the head
            return F.linear(hidden, self.model.embed_tokens.weight).float()  # [N, vocab]
        return self.lm_head(hidden).float()  # [N, vocab] (nn.Linear or a quantized head)

    # ---- weights -------------------------------------------------------
    # HF sub-name -> (fused parameter, shard index)
    _fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def _shard_offsets(self, fused: str) -> list[int]:
        a = self.model.layers[0].self_attn
        if fused == "qkv_proj":
            return [0, a.q_size, a.q_size + a.kv_size, a.q_size + 2 * a.kv_size]
        inter = self.model.layers[0].mlp.inter
        return [0, inter, 2 * inter]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters())
        # Modules that take their weight themselves (batchlm.quantization's
        # QuantLinear/QuantEmbedding): `take_weight(rows, tensor)`, `missing()`.
        sinks = {f"{n}.weight": m for n, m in self.named_modules() if hasattr(m, "take_weight")}
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: some checkpoints store the copy anyway
            target, rows = name, None
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in self._fused:
                fused, idx = self._fused[parts[-2]]
                offs = self._shard_offsets(fused)
                target = ".".join(parts[:-2] + [fused, parts[-1]])
                rows = (offs[idx], offs[idx + 1])
            if target in sinks:
                sinks[target].take_weight(rows, tensor)
                continue
            if not isinstance(tensor, torch.Tensor):  # a quantized checkpoint tensor (GroupQuant)
                tensor = tensor.dequantize()
            param = params.get(target)
            if param is None:
                raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
            dest = param if rows is None else param[rows[0]:rows[1]]
            if dest.shape != tensor.shape:
                raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(name if rows is None else f"{target}#{rows[0]}")
        missing = []
        for pname, param in params.items():
            if pname.rsplit(".", 1)[0].split(".")[-1] in ("qkv_proj", "gate_up_proj"):
                offs = self._shard_offsets(pname.split(".")[-2])
                missing += [f"{pname}#{o}" for o in offs[:-1] if f"{pname}#{o}" not in loaded]
            elif pname not in loaded:
                missing.append(pname)
        for sink in sinks.values():
            missing += sink.missing()
        if missing:
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:8])}"
                             + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    def qkv_bias(self, config) -> bool:
        return True

    def o_bias(self, config) -> bool:
        return False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
