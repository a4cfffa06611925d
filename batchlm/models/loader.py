"""`load_model`: from a model string to a ready batchlm module and its tokenizer.

Contract
--------
`load_model(model, dtype, device, attention, quantization=None, layer_kernels=None) -> LoadedModel`
(layer_kernels: None, or batchlm.kernels.get_layer_kernels' fused ops, given to the module):
1. resolves `model` to a local HF-format directory (batchlm.models.resolve:
   short name, directory, or .gguf converted once and cached);
2. finds its safetensors (pickle-only directories are refused, ValueError);
3. reads `config.json` with transformers (never trust_remote_code) and picks
   the class through batchlm.models.registry;
4. builds the module on the meta device, materializes it on `device` without
   initializing, and copies the checkpoint tensors in (cast to `dtype`);
5. loads the HF fast tokenizer (None if the directory has no tokenizer files).

With `quantization` (see batchlm.quantization.config), the linear layers (and,
unless lm_head=False, the embeddings/LM head) are swapped for quantized ones
before loading and receive the weights one tensor at a time; a GGUF model is
then read straight from the GGUF (its quantized blocks become int8/int4
without a float copy of the model; batchlm.models.gguf_weights), and its
cached directory holds only config and tokenizer.
The module is returned in eval mode with gradients off.

`dtype`: a torch.dtype, or "auto"/None for the checkpoint's own dtype
(`config.dtype`, float32 when unknown, e.g. dequantized GGUF).

`kv_cache_shape(config) -> (num_layers, num_kv_heads, head_dim)`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from batchlm.models.registry import get_model_class
from batchlm.models.resolve import gguf_source, resolve_model
from batchlm.quantization.apply import finish, swap_in
from batchlm.quantization.config import QuantConfig, parse_quantization
from batchlm.models.weights import iter_weights, safetensors_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class LoadedModel:
    module: torch.nn.Module
    tokenizer: Any  # transformers PreTrainedTokenizerFast, or None
    hf_config: Any  # transformers PretrainedConfig
    model_dir: Path
    name: str
    dtype: torch.dtype
    quantization: QuantConfig | None = None
    kernel_plan: dict = field(default_factory=dict)  # quantized kernels by layer shape
    source: Path | None = None  # where the weights were read (a GGUF when quantizing one)


def kv_cache_shape(config) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def resolve_dtype(config, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        found = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if isinstance(found, str):
            found = getattr(torch, found, None)
        return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch dtype, a dtype name or 'auto', got {dtype!r}")


def load_config(model_dir: Path):
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot read model config in {model_dir}: {e}") from e


def load_tokenizer(model_dir: Path):
    if not any((model_dir / f).is_file() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def load_model(model: str, dtype: torch.dtype | str | None, device: torch.device | str,
               attention, quantization=None, layer_kernels=None) -> LoadedModel:
    qcfg = parse_quantization(quantization)
    gguf = gguf_source(str(model)) if qcfg is not None else None
    model_dir, name = resolve_model(str(model), weights=gguf is None)
    config = load_config(model_dir)
    if gguf is not None:
        from batchlm.models.gguf_weights import iter_gguf_weights

        weights = iter_gguf_weights(gguf, config)
    else:
        weights = iter_weights(safetensors_files(model_dir))
    cls = get_model_class(config)
    dtype = resolve_dtype(config, dtype)
    device = torch.device(device)
    with torch.device("meta"):
        module = cls(config, attention, dtype, layer_kernels)
        sinks = swap_in(module, qcfg, dtype) if qcfg is not None else []
    module.to_empty(device=device)
    module.load_weights(weights)
    plan = finish(module, sinks, dtype, device) if qcfg is not None else {}
    module.eval().requires_grad_(False)
    return LoadedModel(module=module, tokenizer=load_tokenizer(model_dir), hf_config=config,
                       model_dir=model_dir, name=name, dtype=dtype, quantization=qcfg,
                       kernel_plan=plan, source=gguf or model_dir)
