"""StructuredOutputsParams and SamplingParams.structured_outputs: the spec's
checks, all before any generation (no model, no tokenizer)."""
import pydantic
import pytest

from batchlm import SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_each_kind_is_accepted_and_keyed():
    kinds = {
        "json": StructuredOutputsParams(json=SCHEMA),
        "regex": StructuredOutputsParams(regex=r"[a-z]{3}\d+"),
        "choice": StructuredOutputsParams(choice=["yes", "no", 'say "hi"\n']),
        "grammar": StructuredOutputsParams(grammar='start: "a" | "b" start'),
        "json_object": StructuredOutputsParams(json_object=True),
    }
    for kind, p in kinds.items():
        assert p.kind == kind
        assert p.key.startswith(kind + ":")
    assert len({p.key for p in kinds.values()}) == len(kinds)


def test_json_forms_share_one_key():
    as_str = StructuredOutputsParams(json='{"required": ["a"], "type": "object", '
                                          '"properties": {"a": {"type": "integer"}}}')
    assert as_str.json == SCHEMA
    assert as_str.key == StructuredOutputsParams(json=SCHEMA).key
    model = StructuredOutputsParams(json=Person)
    assert model.json == Person.model_json_schema()


def test_gbnf_grammar_is_converted():
    p = StructuredOutputsParams(grammar='root ::= "yes" | "no"')
    assert "start" in p.llguidance_grammar() or "root" in p.llguidance_grammar()


@pytest.mark.parametrize("kwargs, words", [
    ({}, ["exactly one", "got none"]),
    ({"json": SCHEMA, "regex": "a"}, ["exactly one", "json and regex"]),
    ({"json": {"type": "objectx"}}, ["StructuredOutputsParams.json", "objectx"]),
    ({"json": {"$ref": "#/definitions/missing"}}, ["StructuredOutputsParams.json", "missing"]),
    ({"json": "{not json"}, ["StructuredOutputsParams.json", "not JSON"]),
    ({"json": 3}, ["StructuredOutputsParams.json", "int"]),
    ({"regex": "[a-z"}, ["StructuredOutputsParams.regex", "unclosed character class"]),
    ({"regex": ""}, ["StructuredOutputsParams.regex", "non-empty"]),
    ({"choice": []}, ["StructuredOutputsParams.choice"]),
    ({"choice": ["a", 1]}, ["StructuredOutputsParams.choice"]),
    ({"grammar": 'start: "a" foo'}, ["StructuredOutputsParams.grammar", "foo"]),
    ({"json_object": "yes"}, ["StructuredOutputsParams.json_object"]),
])
def test_bad_specs_name_the_problem(kwargs, words):
    with pytest.raises(ValueError) as e:
        StructuredOutputsParams(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_sampling_params_takes_an_instance_or_a_dict():
    p = SamplingParams(structured_outputs={"json": SCHEMA})
    assert isinstance(p.structured_outputs, StructuredOutputsParams)
    assert p.structured_outputs == StructuredOutputsParams(json=SCHEMA)
    q = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"]))
    assert q.clone(temperature=0.0).structured_outputs == q.structured_outputs
    assert SamplingParams().structured_outputs is None


def test_sampling_params_refuses_bad_structured_outputs():
    with pytest.raises(ValueError, match="unknown field.*schema"):
        SamplingParams(structured_outputs={"schema": SCHEMA})
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs must be"):
        SamplingParams(structured_outputs="json")
    with pytest.raises(ValueError, match="StructuredOutputsParams.regex"):
        SamplingParams(structured_outputs={"regex": "(unclosed"})
