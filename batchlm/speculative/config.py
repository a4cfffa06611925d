"""SpeculativeConfig: what `speculative_config=` asks for, parsed and validated.

Contract
--------
`parse_speculative_config(value) -> SpeculativeConfig | None` accepts what
users write in `LLM(speculative_config=...)` and under
`model: speculative_config:` in the job YAML (the same shape as vLLM's):
- None: no speculation;
- `{"method": "ngram", "num_speculative_tokens": k,
  "prompt_lookup_min": a, "prompt_lookup_max": b}`: prompt lookup, proposing
  up to k tokens by matching the last n tokens (n from b down to a) against
  the sequence's own prompt and output;
- `{"method": "draft", "model": PATH_OR_NAME, "num_speculative_tokens": k}`:
  a smaller draft model with the same tokenizer.
Both take `"disable_by_batch_size": N` (default 32): a step with more than N
running decodes does not speculate (a large batch is compute-bound).
Unknown keys and bad values raise ValueError naming the field
(`speculative_config.<field> ...`) and what is allowed.

Plain Python: no torch here (EngineConfig validates through it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16
_KEYS = {
    "ngram": ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
              "disable_by_batch_size"),
    "draft": ("method", "num_speculative_tokens", "model", "disable_by_batch_size"),
}
DEFAULT_LOOKUP_MIN = 1
DEFAULT_LOOKUP_MAX = 4
# NOTE: a step with more running decodes than this does not speculate. A large
# batch is compute-bound: there, verifying k guesses per sequence costs about k
# times a decode's compute and saves little. A guess, to be tuned by measuring.
DEFAULT_DISABLE_BY_BATCH_SIZE = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # ngram | draft
    num_speculative_tokens: int  # k: tokens proposed (and verified) per step and sequence
    prompt_lookup_min: int = DEFAULT_LOOKUP_MIN  # ngram: shortest suffix matched
    prompt_lookup_max: int = DEFAULT_LOOKUP_MAX  # ngram: longest suffix matched (tried first)
    model: str | None = None  # draft: the draft model (short name, HF dir or .gguf)
    # No speculation in a step with more running decodes than this.
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE


def _positive_int(name: str, value: Any, upper: int | None = None) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if ok and upper is not None:
        ok = value <= upper
    if not ok:
        allowed = f"an integer in [1, {upper}]" if upper else "an integer >= 1"
        raise ValueError(f"speculative_config.{name} must be {allowed}, got {value!r}")
    return value


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    if value is None:
        return None
    if isinstance(value, SpeculativeConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError("speculative_config must be None or a dict such as "
                         "{'method': 'ngram', 'num_speculative_tokens': 4}, "
                         f"got {type(value).__name__} {value!r}")
    method = value.get("method")
    if method not in METHODS:
        raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}, got {method!r}")
    unknown = sorted(set(value) - set(_KEYS[method]))
    if unknown:
        raise ValueError(f"speculative_config has unknown key(s) {', '.join(map(str, unknown))} for method "
                         f"{method!r} (known: {', '.join(_KEYS[method])})")
    if "num_speculative_tokens" not in value:
        raise ValueError("speculative_config.num_speculative_tokens is required (an integer in "
                         f"[1, {MAX_SPECULATIVE_TOKENS}])")
    k = _positive_int("num_speculative_tokens", value["num_speculative_tokens"], MAX_SPECULATIVE_TOKENS)
    pause = _positive_int("disable_by_batch_size",
                          value.get("disable_by_batch_size", DEFAULT_DISABLE_BY_BATCH_SIZE))
    if method == "draft":
        model = value.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ValueError(f"speculative_config.model must name the draft model (a short name, an HF "
                             f"directory or a .gguf file), got {model!r}")
        return SpeculativeConfig("draft", k, model=model, disable_by_batch_size=pause)
    lo = _positive_int("prompt_lookup_min", value.get("prompt_lookup_min", DEFAULT_LOOKUP_MIN))
    hi = _positive_int("prompt_lookup_max", value.get("prompt_lookup_max", max(lo, DEFAULT_LOOKUP_MAX)))
    if hi < lo:
        raise ValueError(f"speculative_config.prompt_lookup_max must be >= prompt_lookup_min ({lo}), got {hi}")
    return SpeculativeConfig("ngram", k, lo, hi, disable_by_batch_size=pause)
