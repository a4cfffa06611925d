"""Speculative decoding: what `speculative_config=` asks for, and the proposers.

Modules:
- config.py  SpeculativeConfig, parse_speculative_config (plain Python)
- ngram.py   NgramProposer: prompt lookup over a sequence's own tokens (plain Python)
- stats.py   SpecStats: proposed, accepted, mean acceptance length
- adaptive.py  next_length: each sequence's next proposal length from its own acceptance

The draft-model proposer needs torch and the engine's model runner: it is
engine/draft.py. Verification (scoring the proposals in one step and keeping
the accepted prefix) lives in the engine (engine/logits_plan.py,
engine/llm_engine.py) and the sampler (sampling/verify.py).
"""
from batchlm.speculative.config import SpeculativeConfig, parse_speculative_config
from batchlm.speculative.ngram import NgramProposer
from batchlm.speculative.stats import SpecStats

__all__ = ["NgramProposer", "SpecStats", "SpeculativeConfig", "parse_speculative_config"]
