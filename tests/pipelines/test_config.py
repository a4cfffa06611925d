"""Config errors: one clear message, exit code 2, no traceback; overrides,
environment interpolation, secrets never printed, result-field diffs."""
from __future__ import annotations

import pytest

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
