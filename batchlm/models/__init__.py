"""batchlm.models: batchlm's own PyTorch implementations of decoder-only models,
chosen from the HF config through a registry, and their weight loading.

Contract (what the engine relies on)
------------------------------------
- `load_model(model, dtype, device, attention) -> LoadedModel`: resolves a short
  name, an HF-format directory (safetensors, single or sharded) or a .gguf
  file; returns the nn.Module in eval mode on `device`, the tokenizer, the HF
  config and the resolved directory. Pickle weights are refused.
- The module: `forward(input_ids [T], positions [T], kv_caches, meta) -> hidden
  [T, hidden_size]` over a flat batch of tokens (see batchlm.kernels.attention
  for `meta` and the cache layout); `compute_logits(hidden [N, hidden]) -> [N,
  vocab] float32`.
- `kv_cache_shape(config) -> (num_layers, num_kv_heads, head_dim)`.
"""
from batchlm.models.loader import LoadedModel, kv_cache_shape, load_model
from batchlm.models.registry import get_model_class

__all__ = ["LoadedModel", "get_model_class", "kv_cache_shape", "load_model"]
