"""Structured outputs: constrained decoding through llguidance.

Modules:
- params.py  StructuredOutputsParams: the user's spec, checked (plain Python)
"""
from batchlm.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
