"""StructuredOutputsParams: constrain one request's output, shaped like vLLM's.

Exactly one of:
- `json`: a JSON schema (a dict, a JSON string, or a pydantic model class,
  whose `model_json_schema()` is used). Output is compact JSON (no free
  whitespace between tokens) that validates against the schema.
- `json_object=True`: any JSON object.
- `regex`: the whole output matches the pattern (Rust `regex` syntax, as
  llguidance takes it: Python's look-arounds and back-references are refused).
- `choice`: a non-empty list of strings; the output is exactly one of them.
- `grammar`: a Lark grammar (llguidance's dialect, `start:` rule), or a GBNF
  grammar (`root ::= ...`, converted to Lark).

Construction checks the shape and compiles the spec to llguidance's grammar
form and validates it without a tokenizer, so a bad schema, regex or grammar
raises ValueError naming the field before any generation. `key` is the
canonical spec: the engine compiles each distinct key once.

Plain Python (llguidance's validation is a Rust extension without torch).
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, fields
from typing import Any

from llguidance import LLMatcher

_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# NOTE: compact JSON: a free-whitespace grammar lets a weak model spend its whole
# max_tokens on spaces and newlines.
_JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self):
        if self.json is not None:
            object.__setattr__(self, "json", _schema_dict(self.json))
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or any(not isinstance(c, str) or not c for c in self.choice)):
                raise ValueError("StructuredOutputsParams.choice must be a non-empty list of non-empty "
                                 f"strings, got {self.choice!r}")
            object.__setattr__(self, "choice", list(self.choice))
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string, got {v!r}")
        if not isinstance(self.json_object, bool):
            raise ValueError(f"StructuredOutputsParams.json_object must be a bool, got {self.json_object!r}")
        chosen = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            got = " and ".join(chosen) if chosen else "none"
            raise ValueError(f"StructuredOutputsParams: exactly one of {', '.join(_KINDS)} must be set, "
                             f"got {got}")
        error = LLMatcher.validate_grammar(self.llguidance_grammar())
        if error:
            raise ValueError(f"StructuredOutputsParams.{self.kind} is not valid: {error.strip()}")

    @classmethod
    def from_value(cls, value) -> "StructuredOutputsParams | None":
        """None, an instance, or a dict of its fields (the YAML form) -> an instance."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"SamplingParams.structured_outputs has unknown field(s) {unknown}; "
                                 f"allowed: {list(_KINDS)}")
            return cls(**value)
        raise ValueError("SamplingParams.structured_outputs must be a StructuredOutputsParams or a dict, "
                         f"got {type(value).__name__}")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """The canonical spec: equal keys compile to the same grammar."""
        value = getattr(self, self.kind)
        return self.kind + ":" + _json.dumps(value, sort_keys=True, separators=(",", ":"))

    def llguidance_grammar(self) -> str:
        """The spec as an llguidance grammar (the string LLMatcher takes)."""
        kind = self.kind
        if kind == "json":
            return LLMatcher.grammar_from_json_schema(self.json, defaults=_JSON_OPTIONS)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=_JSON_OPTIONS)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(self.regex)
        if kind == "choice":
            # NOTE: JSON string literals are valid Lark literals: any text is quoted safely.
            return LLMatcher.grammar_from_lark("start: " + " | ".join(_json.dumps(c) for c in self.choice))
        text = self.grammar
        if "::=" in text and "start:" not in text:
            from llguidance.gbnf_to_lark import gbnf_to_lark

            text = gbnf_to_lark(text)
        return LLMatcher.grammar_from_lark(text)


def _schema_dict(value) -> dict:
    """json= as given -> the schema dict (ValueError naming the field when it is not one)."""
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        value = value.model_json_schema()  # a pydantic model class
    elif isinstance(value, str):
        try:
            value = _json.loads(value)
        except ValueError as e:
            raise ValueError(f"StructuredOutputsParams.json is a string but not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("StructuredOutputsParams.json must be a JSON-schema dict, a JSON string or a "
                         f"pydantic model class, got {type(value).__name__}")
    return value
