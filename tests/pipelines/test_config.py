"""Config errors: one clear message, exit code 2, no traceback; overrides,
environment interpolation, secrets never printed, result-field diffs."""
from __future__ import annotations

import textwrap
import tracemalloc

import pytest
import yaml

from batchlm.pipelines.config import diff_fields, load_config, parse_config, result_fields
from batchlm.pipelines.errors import ConfigError

from .helpers import DOCS, cli, tiny_job, write_yaml


def _err(tmp_path, data) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write_yaml(tmp_path / "c.yaml", data))
    return str(e.value)


def test_unknown_key_names_path_and_hint(tmp_path):
    msg = _err(tmp_path, tiny_job("m", "o", input={"formatt": "x"}))
    assert "input.formatt: unknown key; did you mean 'format'?" in msg


def test_wrong_type_names_path(tmp_path):
    assert "sampling.max_tokens" in _err(tmp_path, tiny_job("m", "o", sampling={"max_tokens": "many"}))
    assert "sampling.temperature: must be >= 0" in _err(tmp_path, tiny_job("m", "o", sampling={"temperature": -1}))
    assert "model.dtype" in _err(tmp_path, tiny_job("m", "o", model={"dtype": "fp7"}))


def test_classify_needs_labels(tmp_path):
    assert "task.labels" in _err(tmp_path, tiny_job("m", "o", task={"type": "classify"}))


def test_set_overrides_and_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_SECRET_KEY", "hunter2")
    path = write_yaml(tmp_path / "c.yaml", tiny_job("m", "o", input={"storage_options": {"key": "${MY_SECRET_KEY}"}}))
    cfg = load_config(path, ["sampling.max_tokens=64", "model.name=other", "output.carry=[topic, text]"])
    assert cfg.sampling.max_tokens == 64 and cfg.model.name == "other" and cfg.output.carry == ["topic", "text"]
    assert cfg.input.storage_options["key"] == "hunter2"
    assert "hunter2" not in repr(result_fields(cfg))
    monkeypatch.delenv("MY_SECRET_KEY")
    assert "MY_SECRET_KEY is not set" in _err(tmp_path, tiny_job("m", "o", input={"storage_options": {"key": "${MY_SECRET_KEY}"}}))


def test_every_engine_and_sampling_option_is_accepted():
    cfg = parse_config(tiny_job("m", "o", model={"max_num_seqs": 8, "enable_prefix_caching": False,
                                                   "kv_cache_memory": 1 << 20, "block_size": 32},
                                sampling={"top_k": 5, "stop": ["\n"], "seed": 3, "repetition_penalty": 1.1}))
    assert cfg.model.engine_kwargs()["block_size"] == 32
    assert cfg.sampling.params().stop == ["\n"]


def test_precision_keys_in_yaml(tmp_path):
    cfg = parse_config(tiny_job("m", "o", model={"quantization": {"method": "int4", "group_size": 128},
                                                   "kv_cache_dtype": "bfloat16"}))
    assert cfg.model.engine_kwargs()["quantization"] == {"method": "int4", "group_size": 128}
    assert parse_config(tiny_job("m", "o", model={"quantization": "int8"})).model.engine_kwargs()["quantization"] == "int8"
    msg = _err(tmp_path, tiny_job("m", "o", model={"quantization": {"method": "int4", "bits": 3}}))
    assert "model.quantization: has unknown key(s) bits" in msg
    assert "model.quantization: must be" in _err(tmp_path, tiny_job("m", "o", model={"quantization": "int9"}))
    assert "model.kv_cache_dtype" in _err(tmp_path, tiny_job("m", "o", model={"kv_cache_dtype": "int8"}))
    # a precision change is a result change: resuming with it is refused
    a = result_fields(parse_config(tiny_job("m", "o")))
    b = result_fields(parse_config(tiny_job("m", "o", model={"quantization": "int8"})))
    assert any("model.quantization" in line for line in diff_fields(a, b))


def test_result_diff_lists_what_changed():
    a = result_fields(parse_config(tiny_job("m", "o")))
    b = result_fields(parse_config(tiny_job("m", "o", sampling={"max_tokens": 9}, resources={"replicas": 3})))
    assert diff_fields(a, b) == ["  sampling.max_tokens: output has 8, this config has 9"]


@pytest.mark.parametrize("case,expect", [
    ("unknown_key", "input.pathh: unknown key"),
    ("wrong_type", "resources.batch_size: Input should be a valid integer"),
    ("missing_input", "no such file or directory"),
    ("unreachable_s3", "input s3://bucket/data.parquet"),
    ("no_config", "config file not found"),
])
def test_cli_config_errors_exit_2_without_traceback(tmp_path, case, expect):
    job = tiny_job("m", str(tmp_path / "out"))
    if case == "unknown_key":
        job["input"]["pathh"] = "x"
    elif case == "wrong_type":
        job["resources"]["batch_size"] = "big"
    elif case == "missing_input":
        job["input"]["path"] = str(tmp_path / "nope.parquet")
    elif case == "unreachable_s3":
        # a closed port on the loopback: connection refused at once
        job["input"] = {"format": "parquet", "path": "s3://bucket/data.parquet",
                        "storage_options": {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}}
    path = write_yaml(tmp_path / "c.yaml", job) if case != "no_config" else str(tmp_path / "absent.yaml")
    for cmd in ("run", "validate"):
        p = cli(cmd, path, timeout=120)
        assert p.returncode == 2, (p.stdout, p.stderr)
        assert "Traceback" not in p.stderr and expect in p.stderr, p.stderr
        assert p.stderr.strip().startswith("error:"), p.stderr
        assert str(DOCS) not in p.stderr or case != "unreachable_s3"



# --- loading: aliases, duplicate keys, encoding -----------------------------

def _job_yaml(tmp_path, extra: str = "") -> str:
    """A valid tiny job written as YAML text, with `extra` appended."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_job("m", "o"), sort_keys=False) + extra)
    return str(path)


def _load_err(path: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


def _alias_bomb(indent: str = "  ") -> str:
    """Billion laughs: nine levels, each listing the one before nine times (9**9 values)."""
    lines = [f"{indent}a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"{indent}a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_is_refused_in_little_memory(tmp_path):
    bomb = "lol:\n" + _alias_bomb()  # under an unknown key: refused before validation sees it
    assert len(bomb) < 700
    path = _job_yaml(tmp_path, bomb)
    tracemalloc.start()
    try:
        msg = _load_err(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert msg == (f"{path}: the config expands to too many values (over 100000 once its YAML aliases "
                   "are expanded); check the anchors (&name) and aliases (*name)")
    assert peak < 20 << 20, peak


def test_alias_bomb_in_a_set_value_and_alias_cycles_are_refused(tmp_path):
    path = _job_yaml(tmp_path)
    flow_bomb = "{" + _alias_bomb(indent="").replace("\n", ", ").rstrip(", ") + "}"
    assert "expands to too many values" in _load_err(path, [f"lol={flow_bomb}"])
    for cycle in ("lol: &l [x, *l]\n", "lol: &l {a: *l}\n"):
        assert _load_err(_job_yaml(tmp_path, cycle)).endswith(
            "a YAML alias is used inside its own anchor (the config refers to itself)")


def test_ordinary_aliases_and_merge_keys_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent("""\
        input:
          format: parquet
          path: DOCS
          storage_options: &s3 {endpoint_url: "http://h", key: k}
        task: {prompt: "Summarize: {{ text }}"}
        output:
          path: o
          storage_options: {<<: *s3, key: other}
        """).replace("DOCS", str(DOCS)))
    cfg = load_config(str(path))
    assert cfg.input.storage_options == {"endpoint_url": "http://h", "key": "k"}
    assert cfg.output.storage_options == {"endpoint_url": "http://h", "key": "other"}


@pytest.mark.parametrize("extra,key,first,second", [
    ("task: {prompt: again}\n", "task", None, 1),  # top level (first: the job's own task)
    ("x:\n  a: 1\n  a: 2\n", "a", 2, 3),  # nested, block style
    ("x: [{a: 1, b: 2,\n  a: 3}]\n", "a", 1, 2),  # in a flow mapping inside a list
])
def test_duplicate_keys_are_refused_with_key_and_line(tmp_path, extra, key, first, second):
    path = _job_yaml(tmp_path, extra)
    job_lines = open(path).read().splitlines()[:-extra.count("\n")]
    n = len(job_lines)
    first = job_lines.index(f"{key}:") + 1 if first is None else n + first
    assert _load_err(path) == (f"{path}: not valid YAML: duplicate key {key!r} on line {n + second} "
                               f"(first on line {first})")


def test_yaml_stays_safe_and_set_values_are_checked(tmp_path):
    path = _job_yaml(tmp_path, "x: !!python/object/apply:os.system [echo hi]\n")
    assert "not valid YAML" in _load_err(path) and "os.system" in _load_err(path)
    path = _job_yaml(tmp_path)
    assert _load_err(path, ["sampling.stop=[secret-ish, {a: 1, a: 2}]"]) == (
        "--set sampling.stop: the value is not valid YAML")
    assert "expected dotted.key=value" in _load_err(path, ["sampling.max_tokens"])


def test_non_utf8_config_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(yaml.safe_dump(tiny_job("m", "o"), sort_keys=False).encode() + b"# caf\xe9\n")
    n = path.read_bytes().count(b"\n")
    assert _load_err(str(path)) == f"{path}: not UTF-8 text (line {n}); save the config as UTF-8"


def test_empty_config_names_the_missing_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    msg = _load_err(str(path))
    assert all(f"{s}: required key is missing" in msg for s in ("input", "task", "output")), msg


def test_speculative_config_in_yaml(tmp_path):
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 3}
    cfg = parse_config(tiny_job("m", "o", model={"speculative_config": spec}))
    assert cfg.model.engine_kwargs()["speculative_config"] == spec
    assert parse_config(tiny_job("m", "o")).model.engine_kwargs()["speculative_config"] is None
    msg = _err(tmp_path, tiny_job("m", "o", model={"speculative_config": {"method": "ngram",
                                                                          "num_speculative_tokens": 0}}))
    assert "model.speculative_config.num_speculative_tokens: must be an integer in [1, 16], got 0" in msg
    msg = _err(tmp_path, tiny_job("m", "o", model={"speculative_config": {"method": "ngram",
                                                                          "num_speculative_tokens": 2,
                                                                          "lookahead": 1}}))
    assert "model.speculative_config: has unknown key(s) lookahead" in msg
    # sampled outputs depend on it: a change is a result change
    a = result_fields(parse_config(tiny_job("m", "o")))
    b = result_fields(parse_config(tiny_job("m", "o", model={"speculative_config": spec})))
    assert any("model.speculative_config" in line for line in diff_fields(a, b))
