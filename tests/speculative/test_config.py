"""speculative_config: accepted shapes, and a ValueError naming the field for
everything else (through LLM's EngineConfig too)."""
from __future__ import annotations

import pytest

from batchlm.config import EngineConfig
from batchlm.speculative import SpeculativeConfig, parse_speculative_config


def test_ngram_and_draft_shapes():
    assert parse_speculative_config(None) is None
    cfg = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 5,
                                    "prompt_lookup_min": 2, "prompt_lookup_max": 6})
    assert cfg == SpeculativeConfig("ngram", 5, 2, 6, disable_by_batch_size=32)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3}) == SpeculativeConfig(
        "ngram", 3, 1, 4, disable_by_batch_size=32)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                     "disable_by_batch_size": 4}).disable_by_batch_size == 4
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 3,
                                     "prompt_lookup_min": 6}).prompt_lookup_max == 6
    draft = parse_speculative_config({"method": "draft", "model": "tiny-draft", "num_speculative_tokens": 4})
    assert draft == SpeculativeConfig("draft", 4, model="tiny-draft")


@pytest.mark.parametrize("value, message", [
    ("ngram", "speculative_config must be None or a dict"),
    ({"num_speculative_tokens": 3}, "speculative_config.method must be one of ngram, draft, got None"),
    ({"method": "medusa", "num_speculative_tokens": 3}, "speculative_config.method must be one of"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "an integer in [1, 16], got 17"),
    ({"method": "ngram", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 2.0}, "speculative_config.num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0},
     "speculative_config.prompt_lookup_min must be an integer >= 1, got 0"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "speculative_config.prompt_lookup_max must be >= prompt_lookup_min (3), got 2"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"},
     "speculative_config has unknown key(s) model for method 'ngram'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown key(s) lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
     "speculative_config.disable_by_batch_size must be an integer >= 1, got 0"),
    ({"method": "draft", "num_speculative_tokens": 2}, "speculative_config.model must name the draft model"),
    ({"method": "draft", "num_speculative_tokens": 2, "model": "m", "prompt_lookup_min": 1},
     "unknown key(s) prompt_lookup_min for method 'draft'"),
])
def test_bad_values_name_the_field(value, message):
    with pytest.raises(ValueError) as e:
        parse_speculative_config(value)
    assert message in str(e.value)
    with pytest.raises(ValueError) as e:  # the same message through the engine's config
        EngineConfig(speculative_config=value)
    assert message in str(e.value)


def test_engine_config_keeps_the_dict():
    spec = {"method": "ngram", "num_speculative_tokens": 4}
    assert EngineConfig(speculative_config=spec).speculative_config == spec
