"""The extract task's own pieces, without an engine: JSON schema -> Arrow columns, the parse and
conversion of one output, and the config's checks (exit 2 before Ray) and resume rules."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchlm.pipelines.config import config_hash, load_config, parse_config, result_fields
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.extract import Extractor, arrow_schema, check_schema, prompt_text
from batchlm.pipelines.manifest import ShardFooter, encode_shard, shard_name
from batchlm.pipelines.output import Expected, open_output
from batchlm.pipelines.render import PromptTemplate
from batchlm.pipelines.stages import output_columns, output_schema
from batchlm.pipelines.storage import Store

from .helpers import cli, tiny_job, write_yaml
from .test_s3 import s3  # noqa: F401 (the moto S3 fixture)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
        "score": {"type": "number"},
        "member": {"type": "boolean"},
        "kind": {"enum": ["cat", "dog"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
                    "required": ["city"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "nick": {"type": ["string", "null"]},
        "extra": {},
    },
    "required": ["name", "age", "kind"],
}


def test_schema_to_arrow_types():
    s = arrow_schema(PERSON)
    assert s.names == list(PERSON["properties"])
    assert s.field("name").type == pa.string() and s.field("age").type == pa.int64()
    assert s.field("score").type == pa.float64() and s.field("member").type == pa.bool_()
    assert s.field("kind").type == pa.string()
    addr = s.field("address").type
    assert addr == pa.struct([pa.field("city", pa.string(), nullable=False), pa.field("zip", pa.int64())])
    assert s.field("tags").type == pa.list_(pa.field("item", pa.string(), nullable=False))
    assert s.field("nick").type == pa.string() and s.field("extra").type == pa.string()  # extra: JSON text
    assert all(f.nullable for f in s)  # top level: an error row holds null


@pytest.mark.parametrize("sub, want", [
    ({"type": ["integer", "number"]}, pa.float64()),
    ({"enum": [1, 2, 3]}, pa.int64()),
    ({"enum": [1, 2.5]}, pa.float64()),
    ({"enum": ["a", 1]}, pa.string()),  # mixed: JSON text
    ({"const": True}, pa.bool_()),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, pa.int64()),  # pydantic's Optional[int]
    ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, pa.string()),  # mixed: JSON text
    ({"type": "object"}, pa.string()),  # no properties: JSON text
    ({"type": "object", "additionalProperties": {"type": "integer"}}, pa.string()),
    ({"type": "array"}, pa.string()),  # no items: JSON text
    ({"type": "array", "items": {"type": "array", "items": {"type": ["number", "null"]}}},
     pa.list_(pa.field("item", pa.list_(pa.field("item", pa.float64())), nullable=False))),
    ({"$ref": "#/$defs/Pet"}, pa.struct([pa.field("pet", pa.string(), nullable=False)])),
    ({"$ref": "#/$defs/Node"}, pa.struct([pa.field("next", pa.string())])),  # recursion -> JSON text inside
])
def test_schema_to_arrow_cases(sub, want):
    schema = {"type": "object", "properties": {"x": sub},
              "$defs": {"Pet": {"type": "object", "properties": {"pet": {"type": "string"}}, "required": ["pet"]},
                        "Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}}}
    check_schema(schema)
    assert arrow_schema(schema).field("x").type == want


GOOD = {"name": "Ada", "age": 36.0, "score": 3, "member": True, "kind": "cat",
        "address": {"city": "London", "zip": 12345}, "tags": ["a", "b"], "nick": None, "extra": {"k": [1, 2]}}


def test_a_good_output_gives_typed_values_that_arrow_takes():
    ex = Extractor(PERSON)
    values, error = ex.values(json.dumps(GOOD), "stop")
    assert error is None
    assert values == {"name": "Ada", "age": 36, "score": 3.0, "member": True, "kind": "cat",
                      "address": {"city": "London", "zip": 12345}, "tags": ["a", "b"], "nick": None,
                      "extra": '{"k": [1, 2]}'}
    assert type(values["age"]) is int and type(values["score"]) is float  # 36.0 -> 36 (a JSON-schema integer)
    missing, _ = ex.values(json.dumps({"name": "B", "age": 1, "kind": "dog", "address": {"city": "X"}}), "stop")
    assert missing["address"] == {"city": "X", "zip": None} and missing["tags"] is None
    rows = [values, missing, {n: None for n in ex.names}]  # the last: an error row
    table = pa.Table.from_pylist(rows, schema=ex.arrow_schema())
    table.validate(full=True)
    assert table.column("address").to_pylist()[1] == {"city": "X", "zip": None}


@pytest.mark.parametrize("text, finish, why", [
    (json.dumps(GOOD)[:-1], "length", "cut by max_tokens"),
    (json.dumps(GOOD), "length", "cut by max_tokens"),  # a cut row is never valid output
    ('{"name": "Ada", "age": ', "stop", "not valid JSON"),
    ('{"name": "Ada", "age": NaN, "kind": "cat"}', "stop", "not valid JSON"),
    ("", "stop", "not valid JSON"),
    ('["Ada"]', "stop", "does not fit the schema"),
    ('{"name": "Ada", "kind": "cat"}', "stop", "'age' is a required property"),
    ('{"name": "Ada", "age": 1.5, "kind": "cat"}', "stop", "at age: 1.5 is not of type 'integer'"),
    ('{"name": "Ada", "age": 1, "kind": "cow"}', "stop", "at kind: 'cow' is not one of"),
    ('{"name": "' + "x" * 21 + '", "age": 1, "kind": "cat"}', "stop", "at name: 'xxxx"),  # maxLength 20
    ('{"name": "Ada", "age": 1, "kind": "cat", "address": {"zip": 1}}', "stop", "'city' is a required"),
    ('{"name": "Ada", "age": 1e30, "kind": "cat"}', "stop", "outside int64"),
    ('{"name": "Ada", "age": 9223372036854775808, "kind": "cat"}', "stop", "outside int64"),
])
def test_a_bad_output_is_an_error_naming_why(text, finish, why):
    values, error = Extractor(PERSON).values(text, finish)
    assert values is None and why in error and len(error) < 400


def test_check_schema_errors_name_the_problem():
    def err(schema):
        with pytest.raises(ValueError) as e:
            check_schema(schema, "task.schema")
        return str(e.value)

    assert "expected a JSON schema object" in err(["x"])
    assert "not a valid JSON schema at properties.a.type" in err({"type": "object", "properties": {"a": {"type": 3}}})
    assert "must be `type: object` with `properties`" in err({"type": "array", "items": {}})
    assert "must be `type: object` with `properties`" in err({"type": "object"})
    assert "'__x' cannot be a column name" in err({"type": "object", "properties": {"__x": {}}})
    assert "not a local reference" in err({"type": "object", "properties": {"a": {"$ref": "http://x/s.json"}}})
    assert "points to nothing" in err({"type": "object", "properties": {"a": {"$ref": "#/$defs/Nope"}}})


def _extract(schema=PERSON, **over) -> dict:
    return tiny_job("m", "o", **{"task": {"type": "extract", "schema": schema}, **over})


def _config_error(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path / "c.yaml", data))
    return str(e.value)


def test_config_errors_name_the_field(tmp_path):
    e = _config_error(tmp_path, tiny_job("m", "o", task={"type": "extract"}))
    assert "task.schema: an extract task needs exactly one of schema (inline) and schema_path" in e
    e = _config_error(tmp_path, tiny_job("m", "o", task={"type": "extract", "schema": PERSON, "schema_path": "x"}))
    assert "both are set" in e
    assert "task.schema: only an extract task" in _config_error(tmp_path, tiny_job("m", "o", task={"schema": PERSON}))
    clash = {"type": "object", "properties": {"topic": {"type": "string"}}}  # tiny_job carries topic
    assert "property 'topic' would be written over a carried column" in _config_error(tmp_path, _extract(clash))
    clash = {"type": "object", "properties": {"error": {"type": "string"}}}
    assert "property 'error' would be written over a standard output column" in _config_error(tmp_path, _extract(clash))
    e = _config_error(tmp_path, _extract({"type": "object", "properties": {"doc": {}}}, input={"id_column": "doc"}))
    assert "property 'doc' would be written over the job's id column (input.id_column)" in e
    e = _config_error(tmp_path, _extract(sampling={"structured_outputs": {"regex": "[a-z]+"}}))
    assert "sampling.structured_outputs: an extract task constrains output by its task.schema" in e
    e = _config_error(tmp_path, tiny_job("m", "o", task={"type": "extract", "labels": ["a", "b"], "schema": PERSON}))
    assert "task.labels: only a classify task takes labels" in e


def test_schema_path_is_read_and_checked(tmp_path):
    path = tmp_path / "person.json"
    path.write_text(json.dumps(PERSON))
    cfg = load_config(write_yaml(tmp_path / "c.yaml", tiny_job("m", "o", task={"type": "extract",
                                                                                  "schema_path": str(path)})))
    assert cfg.task.json_schema == PERSON and cfg.sampling_params().structured_outputs.json == PERSON
    assert result_fields(cfg)["task"]["schema"] == PERSON  # the file's content decides resume, not its name
    path.write_text("{not json")
    e = _config_error(tmp_path, tiny_job("m", "o", task={"type": "extract", "schema_path": str(path)}))
    assert f"task.schema_path {path}: not a JSON file" in e
    path.write_text(json.dumps({"type": "object", "properties": {"id": {"type": "string"}}}))
    e = _config_error(tmp_path, tiny_job("m", "o", task={"type": "extract", "schema_path": str(path)}))
    assert f"task.schema_path {path}: property 'id' would be written over the job's id column" in e
    e = _config_error(tmp_path, tiny_job("m", "o", task={"type": "extract", "schema_path": str(tmp_path / "no")}))
    assert "task.schema_path" in e and "not found" in e


def test_a_config_error_exits_2_before_ray(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", _extract({"type": "object", "properties": {"x": {"type": "strin"}}},
                                                   output={"path": str(tmp_path / "out")}))
    r = cli("run", cfg, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "task.schema: not a valid JSON schema at properties.x.type" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_structured_outputs_for_generate_and_their_errors(tmp_path):
    cfg = parse_config(tiny_job("m", "o", sampling={"structured_outputs": {"choice": ["yes", "no"]}}))
    assert cfg.sampling_params().structured_outputs.choice == ["yes", "no"]
    e = _config_error(tmp_path, tiny_job("m", "o", sampling={"structured_outputs": {"regex": "a", "choice": ["x"]}}))
    assert "sampling.structured_outputs: exactly one of json, regex, choice, grammar" in e
    e = _config_error(tmp_path, tiny_job("m", "o", sampling={"structured_outputs": {"regx": "a"}}))
    assert "sampling.structured_outputs: has unknown field(s) ['regx']" in e
    e = _config_error(tmp_path, tiny_job("m", "o", sampling={"structured_outputs": {"regex": "(?=a)b"}}))
    assert "sampling.structured_outputs.regex: is not valid" in e


def test_older_outputs_keep_their_config_hash():
    """The new keys are absent from result_fields unless set: a generate job's hash is unchanged."""
    fields = result_fields(parse_config(tiny_job("m", "o")))
    assert "schema" not in fields["task"] and "schema_path" not in fields["task"]
    assert "structured_outputs" not in fields["sampling"]


def _expected(cfg) -> Expected:
    return Expected(result_fields(cfg), "plan", 2, 20, {"data.parquet": {"size": 1}}, ("data.parquet",) * 2)


def _started(store, expected: Expected) -> None:
    """An output with its first unit committed under `expected`'s config."""
    store.ensure_root()
    m = open_output(store, expected).manifest
    table = pa.table({"id": [f"r{i}" for i in range(10)], "error": pa.array([None] * 10, pa.string())})
    footer = ShardFooter(rows=10, config_hash=expected.config_hash, plan=expected.plan)
    m.units[0] = footer.record(store.write_atomic(shard_name(0), encode_shard(table, footer, "zstd")))
    m.save(store)


def test_resume_with_a_changed_schema_or_constraint_is_refused(tmp_path):
    store = Store(str(tmp_path / "out"))
    _started(store, _expected(parse_config(_extract())))
    changed = json.loads(json.dumps(PERSON))
    changed["properties"]["age"]["type"] = "number"
    with pytest.raises(ConfigError, match=r"task.schema.properties.age.type: output has 'integer', this config "
                                          r"has 'number'"):
        open_output(store, _expected(parse_config(_extract(changed))))
    open_output(store, _expected(parse_config(_extract())))  # the same schema resumes

    store = Store(str(tmp_path / "out2"))
    _started(store, _expected(parse_config(tiny_job("m", "o", sampling={"structured_outputs": {"regex": "a+"}}))))
    with pytest.raises(ConfigError, match=r"sampling.structured_outputs.regex: output has 'a\+', this config has"):
        open_output(store, _expected(parse_config(tiny_job("m", "o", sampling={"structured_outputs": {"regex": "b+"}}))))
    assert config_hash(result_fields(parse_config(_extract()))) != config_hash(
        result_fields(parse_config(tiny_job("m", "o"))))


def test_output_columns_one_list_and_the_prompt_sees_the_schema():
    names = output_columns("extract", PERSON)
    assert names == ["generated_text", "finish_reason", "num_input_tokens", "num_output_tokens",
                     *PERSON["properties"], "error"]
    assert output_schema("extract", None, PERSON).names == names
    assert output_schema("extract", None, PERSON).field("address").type == arrow_schema(PERSON).field("address").type
    cfg = parse_config(_extract(task={"type": "extract", "schema": PERSON, "prompt": "{{ text }}\n{{ schema }}"}))
    template = PromptTemplate(cfg.task)
    assert template.fields() == ["text"]  # `schema` is the task's, not an input column
    prompt, _, err = template.render({"text": "Ada is 36.", "schema": "a column"})
    assert err is None and prompt == "Ada is 36.\n" + prompt_text(PERSON)


def test_typed_columns_round_trip_through_parquet(tmp_path):
    ex = Extractor(PERSON)
    values, _ = ex.values(json.dumps(GOOD), "stop")
    table = pa.Table.from_pylist([values, {n: None for n in ex.names}], schema=ex.arrow_schema())
    pq.write_table(table, tmp_path / "t.parquet")
    back = pq.read_table(tmp_path / "t.parquet")
    assert back.schema.equals(ex.arrow_schema()) and back.to_pylist()[0] == values


def test_schema_path_on_s3_is_read_with_the_input_storage_options(tmp_path, s3):
    fs, opts = s3
    fs.pipe("batchlm-in/schemas/person.json", json.dumps(PERSON).encode())
    job = tiny_job("m", "o", input={"storage_options": opts},
                   task={"type": "extract", "schema_path": "s3://batchlm-in/schemas/person.json"})
    cfg = load_config(write_yaml(tmp_path / "c.yaml", job))
    assert cfg.task.json_schema == PERSON
    job["task"]["schema_path"] = "s3://batchlm-in/schemas/missing.json"
    e = _config_error(tmp_path, job)
    assert "task.schema_path s3://batchlm-in/schemas/missing.json: not found" in e and "testing" not in e
