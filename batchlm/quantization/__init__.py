"""batchlm.quantization: int8 / int4 / fp8 weights for the model's linear layers.

Modules
-------
- config.py: QuantConfig and parse_quantization (plain Python; EngineConfig uses it).
- groupquant.py: GroupQuant, the canonical quantized matrix, and the quantizers.
- modules.py: QuantLinear / QuantEmbedding, weight sinks that pack for the kernels.
- apply.py: swap a model's layers for quantized ones before loading; finish after.
- plan.py: time the kernels per shape and batch size, keep the fastest (cached on disk).

Import the torch parts from their modules; this package imports only config.
"""
from batchlm.quantization.config import QuantConfig, parse_quantization

__all__ = ["QuantConfig", "parse_quantization"]
