"""Which batchlm class implements an HF config: a lazy map from architecture name.

Contract
--------
`get_model_class(config_or_name) -> type`: looks up `config.architectures[0]`,
then falls back to `config.model_type`; a string is looked up directly as
either. The implementing module is imported only when chosen. An unknown
architecture raises ValueError naming it and listing the supported ones.
"""
from __future__ import annotations

import importlib

# HF architecture name -> (module, class)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("batchlm.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("batchlm.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("batchlm.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("batchlm.models.llama", "Qwen3ForCausalLM"),
}

# HF model_type -> architecture name (for configs without `architectures`)
_MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_model_class(config_or_name) -> type:
    if isinstance(config_or_name, str):
        candidates = [config_or_name]
    else:
        candidates = list(getattr(config_or_name, "architectures", None) or [])[:1]
        model_type = getattr(config_or_name, "model_type", None)
        if model_type:
            candidates.append(model_type)
    for name in candidates:
        arch = name if name in _ARCHITECTURES else _MODEL_TYPES.get(name)
        if arch is not None:
            module, cls = _ARCHITECTURES[arch]
            return getattr(importlib.import_module(module), cls)
    shown = " / ".join(repr(c) for c in candidates) or "(none given)"
    raise ValueError(f"unsupported model architecture {shown}; batchlm supports: "
                     f"{', '.join(supported_architectures())}")
