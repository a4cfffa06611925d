"""QuantConfig: what `quantization=` asks for, parsed and validated.

Contract
--------
`parse_quantization(value) -> QuantConfig | None` accepts what users write in
`LLM(quantization=...)` and under `model: quantization:` in the job YAML:
- None / "none": no quantization;
- a method name: "int8" (weight-only), "int8_dynamic" (int8 weights and
  activations quantized per token at run time), "int4" (weight-only, group
  64 unless the checkpoint is already 4-bit), "int4_g32" / "int4_g64" /
  "int4_g128", "fp8" (e4m3 weights and per-token activations, CUDA only);
- a dict: `{"method": "int4", "group_size": 128, "lm_head": false, "dense_layers": [0]}`.
Anything else raises ValueError naming the field and the allowed values.

`lm_head` (default True): the embedding table and the LM head are quantized
too (on tied models they are one table); False keeps them in the model dtype.
`dense_layers` (default none): decoder layers, by index (negative from the
end), whose linear layers keep the model dtype: where one layer costs most
of a method's quality (fp8: the last layer of the default model, README).
`group_size` applies to int4 (32, 64, 128 or 256); int8 and fp8 use one scale
per output channel.

Plain Python: no torch here (EngineConfig validates through it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("int8", "int8_dynamic", "int4", "fp8")
INT4_GROUPS = (32, 64, 128, 256)
DEFAULT_INT4_GROUP = 64
_ALLOWED = "None, 'int8', 'int8_dynamic', 'int4', 'int4_g32', 'int4_g64', 'int4_g128', 'fp8' or a dict"


@dataclass(frozen=True)
class QuantConfig:
    method: str  # int8 | int8_dynamic | int4 | fp8
    group_size: int | None = None  # int4 only; None: the checkpoint's 4-bit group, else 64
    lm_head: bool = True
    dense_layers: tuple[int, ...] = ()  # decoder layer indices left unquantized (negative: from the end)

    @property
    def bits(self) -> int:
        return 4 if self.method == "int4" else 8

    @property
    def dynamic_activations(self) -> bool:
        return self.method in ("int8_dynamic", "fp8")

    @property
    def name(self) -> str:
        extra = f"_g{self.group_size}" if self.group_size else ""
        dense = [] if self.lm_head else ["lm_head"]
        dense += [f"layer {i}" for i in self.dense_layers]
        return self.method + extra + (f" ({', '.join(dense)} unquantized)" if dense else "")


def parse_quantization(value: Any) -> QuantConfig | None:
    if value is None or value == "none":
        return None
    if isinstance(value, QuantConfig):
        return value
    if isinstance(value, str):
        method, _, group = value.partition("_g")
        if method == "int4" and group:
            if not group.isdigit():
                raise ValueError(f"quantization must be {_ALLOWED}, got {value!r}")
            return _build("int4", int(group), True, value)
        return _build(value, None, True, value)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"method", "group_size", "lm_head", "dense_layers"})
        if unknown:
            raise ValueError(f"quantization has unknown key(s) {', '.join(unknown)} "
                             "(known: method, group_size, lm_head, dense_layers)")
        if "method" not in value:
            raise ValueError("quantization needs a 'method' key (int8, int8_dynamic, int4, fp8)")
        lm_head = value.get("lm_head", True)
        if not isinstance(lm_head, bool):
            raise ValueError(f"quantization.lm_head must be true or false, got {lm_head!r}")
        dense = value.get("dense_layers") or []
        if (not isinstance(dense, (list, tuple)) or len(set(dense)) != len(dense)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in dense)):
            raise ValueError(f"quantization.dense_layers must be a list of distinct layer indices, got {dense!r}")
        return _build(value["method"], value.get("group_size"), lm_head, value, tuple(dense))
    raise ValueError(f"quantization must be {_ALLOWED}, got {value!r}")


def _build(method, group_size, lm_head: bool, raw, dense_layers: tuple[int, ...] = ()) -> QuantConfig:
    if method not in METHODS:
        raise ValueError(f"quantization must be {_ALLOWED}, got {raw!r}")
    if group_size is not None:
        if method != "int4":
            raise ValueError(f"quantization.group_size applies to int4 only, not {method!r} "
                             "(int8 and fp8 use one scale per output channel)")
        if isinstance(group_size, bool) or group_size not in INT4_GROUPS:
            raise ValueError(f"quantization.group_size must be one of {INT4_GROUPS}, got {group_size!r}")
    return QuantConfig(method, group_size, lm_head, dense_layers)
