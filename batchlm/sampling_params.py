"""SamplingParams: how to sample one request, shaped like vLLM's.

Validation happens at construction: a bad value raises ValueError naming the
field and its allowed range.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from batchlm.structured.params import StructuredOutputsParams


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token
    prompt_logprobs: int | None = None  # top-k logprobs per prompt token
    skip_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None  # keep the last k prompt tokens
    # Constrained decoding (batchlm.structured): a StructuredOutputsParams or a
    # dict of its fields (the YAML form), checked here, before any generation.
    structured_outputs: StructuredOutputsParams | dict | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        self._validate()

    def _validate(self):
        def bad(name, allowed):
            raise ValueError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "an integer >= 1")
        if not self.temperature >= 0.0:
            bad("temperature", ">= 0")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", "in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", "-1 (disabled) or an integer >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", "in [0, 1]")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", "in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", "in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            bad("repetition_penalty", "> 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad("max_tokens", "an integer >= 1 or None")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", "an integer or None")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                bad(name, "an integer >= 0 or None")
        if self.truncate_prompt_tokens is not None and (
                not isinstance(self.truncate_prompt_tokens, int) or self.truncate_prompt_tokens < 1):
            bad("truncate_prompt_tokens", "an integer >= 1 or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a non-empty string or a list of them")
        if any(not isinstance(t, int) for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of integers")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def clone(self, **changes) -> "SamplingParams":
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(changes)
        return SamplingParams(**d)
