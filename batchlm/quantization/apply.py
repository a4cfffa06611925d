"""Put quantized layers into a model before its weights load, and finish them after.

Contract
--------
`swap_in(module, qcfg, dtype) -> list[_QuantWeight]`: call on the freshly built
model (the meta device is fine). Every nn.Linear becomes a QuantLinear; when
`qcfg.lm_head`, every nn.Embedding becomes a QuantEmbedding (an untied
`lm_head` Linear is swapped like the others; with `lm_head=False` it and the
embeddings stay in the model dtype); the linears of `qcfg.dense_layers` (indices
into the model's decoder-layer list) stay too, and an index past that list
raises ValueError. Returns the new modules, in model order.

`finish(module, sinks, dtype, device, cache_file=None) -> plan`: after
`load_weights`, packs every sink on `device`, gives a tied model a LM head
that shares the quantized embedding table, and chooses the kernels
(batchlm.quantization.plan). Returns the kernel plan by shape.

`weight_bytes(module)`: bytes of the module's parameters and buffers (each
tensor once), the figure quoted against float32.
"""
from __future__ import annotations

import torch
from torch import nn

from batchlm.quantization.config import QuantConfig
from batchlm.quantization.modules import QuantEmbedding, QuantLinear, _QuantWeight
from batchlm.quantization.plan import plan_kernels


def _dense_prefixes(module: nn.Module, qcfg: QuantConfig) -> tuple[str, ...]:
    """Module-name prefixes of the decoder layers `qcfg.dense_layers` names, e.g. "model.layers.0."."""
    if not qcfg.dense_layers:
        return ()
    lists = [(name, m) for name, m in module.named_modules() if name.endswith("layers") and isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError("quantization.dense_layers: this model has no list of decoder layers")
    path, layers = lists[0]
    n = len(layers)
    bad = [i for i in qcfg.dense_layers if not -n <= i < n]
    if bad:
        raise ValueError(f"quantization.dense_layers: {bad} out of range for a model of {n} layers "
                         f"(0..{n - 1}, or negative from the end)")
    return tuple(f"{path}.{i % n}." for i in qcfg.dense_layers)


def swap_in(module: nn.Module, qcfg: QuantConfig, dtype: torch.dtype) -> list[_QuantWeight]:
    sinks = []
    dense = _dense_prefixes(module, qcfg)
    for parent_name, parent in list(module.named_modules()):
        for attr, child in list(parent.named_children()):
            name = f"{parent_name}.{attr}" if parent_name else attr
            if isinstance(child, nn.Linear):
                if (attr == "lm_head" and not qcfg.lm_head) or name.startswith(dense):
                    continue
                new = QuantLinear(child.in_features, child.out_features, child.bias is not None,
                                  qcfg, dtype, name)
            elif isinstance(child, nn.Embedding) and qcfg.lm_head:
                new = QuantEmbedding(child.num_embeddings, child.embedding_dim, qcfg, dtype, name)
            else:
                continue
            setattr(parent, attr, new)
            sinks.append(new)
    return sinks


def finish(module: nn.Module, sinks: list[_QuantWeight], dtype: torch.dtype, device: torch.device,
           cache_file=None):
    for sink in sinks:
        sink.finish(device)
    embeds = [s for s in sinks if isinstance(s, QuantEmbedding)]
    if getattr(module, "tie_word_embeddings", False) and getattr(module, "lm_head", 0) is None and embeds:
        module.lm_head = embeds[0].as_linear()
    linears = [m for m in module.modules() if isinstance(m, QuantLinear)]
    return plan_kernels(linears, dtype, device, cache_file)


def weight_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
