"""The default real model (SmolLM2-135M-Instruct) under a JSON schema with
nested objects, enums, arrays, numbers and required fields: every output
parses and validates (jsonschema), greedy and at temperature 1 over seeds;
regex and choice outputs match."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from batchlm import LLM, SamplingParams, StructuredOutputsParams

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "height_m": {"type": "number", "minimum": 0, "maximum": 3, "multipleOf": 0.25},
        "role": {"enum": ["student", "teacher", "engineer", "other"]},
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                    "properties": {"city": {"type": "string", "maxLength": 30},
                                   "zip": {"type": "integer", "minimum": 0, "maximum": 99999}}},
    },
    "required": ["name", "age", "height_m", "role", "skills", "address"],
    "additionalProperties": False,
}
TEXTS = ["Maria is a 34 year old engineer from Lyon (69001), 1.70 m tall, who knows Python and Rust.",
         "Tom, 12, is a student in Leeds. He is short and loves chess.",
         "Dr. Okafor teaches physics in Lagos; she is 51 and speaks three languages.",
         "Ken is a retired pilot living in Osaka, aged 70, skilled at sailing."]


@pytest.fixture(scope="module")
def llm():
    return LLM(model="smollm2-135m-instruct", dtype="float32", kv_cache_memory=1 << 28, max_model_len=512)


def _convs():
    return [[{"role": "user", "content": f"Extract the person as JSON: {t}"}] for t in TEXTS]


def test_json_outputs_validate_greedy_and_sampled(llm):
    so = StructuredOutputsParams(json=SCHEMA)
    params = [SamplingParams(temperature=0, max_tokens=160, structured_outputs=so)] * 4 + [
        SamplingParams(temperature=1.0, seed=s, max_tokens=160, structured_outputs=so) for s in range(4)]
    outs = llm.chat(_convs() * 2, params, use_tqdm=False)
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_regex_and_choice(llm):
    rx = r"[A-Z][a-z]+, [0-9]{1,3}"
    outs = llm.chat(_convs(), [SamplingParams(temperature=t, seed=1, max_tokens=40,
                                              structured_outputs={"regex": rx}) for t in (0, 1, 0, 1)],
                    use_tqdm=False)
    assert all(re.fullmatch(rx, o.outputs[0].text) for o in outs), [o.outputs[0].text for o in outs]
    roles = ["student", "teacher", "engineer", "other"]
    outs = llm.chat(_convs(), SamplingParams(temperature=0, max_tokens=10, structured_outputs={"choice": roles}),
                    use_tqdm=False)
    assert all(o.outputs[0].text in roles for o in outs)
