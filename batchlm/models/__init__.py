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
- `get_model_class(config_or_arch_name) -> type`; unknown -> ValueError listing
  the supported architectures.

`dtype` may also be "auto"/None (the checkpoint's dtype, float32 if unknown);
`LoadedModel.tokenizer` is None when the directory has no tokenizer files.

Modules
-------
- registry.py: HF architecture name / model_type -> batchlm class, lazily.
- llama.py: Llama, SmolLM2, Mistral, Qwen2, Qwen3 over a flat token batch.
- rope.py: rotary cos/sin table (all HF rope types via ROPE_INIT_FUNCTIONS).
- loader.py: load_model, LoadedModel, kv_cache_shape.
- resolve.py: model string (short name, directory, .gguf) -> local HF directory.
- gguf.py: GGUF -> cached HF-format directory (atomic, converted once).
- weights.py: safetensors discovery (single/sharded), pickle refusal, tensor iteration.
"""
from batchlm.models.loader import LoadedModel, kv_cache_shape, load_model
from batchlm.models.registry import get_model_class

__all__ = ["LoadedModel", "get_model_class", "kv_cache_shape", "load_model"]
