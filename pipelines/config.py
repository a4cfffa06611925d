"""The job config: YAML in, a validated `JobConfig` out (pydantic lives only here).

Contract
--------
- `load_config(path, overrides=()) -> JobConfig`. The file must be UTF-8 and
  is read with safe_load's rules (no code tags), except that a key given twice
  in one mapping is an error naming the key and its lines; `overrides` are
  `dotted.key=value` strings (the value is parsed as YAML, so `--set
  sampling.max_tokens=64` gives an int); a config that expands past
  MAX_CONFIG_VALUES values through YAML aliases is refused before anything
  copies it; then every `${ENV_VAR}` inside a string is replaced from the
  environment; then pydantic validates with unknown keys forbidden and no type
  coercion. Any problem raises ConfigError with the key's dotted path and a
  hint; values are never echoed (they may be secrets).
- The `model` and `sampling` sections are generated from the engine's own
  dataclasses (EngineConfig, SamplingParams), so every engine option and every
  sampling field is accepted by name and checked by the engine's own rules.
- Formats: `input.format: openai_batch` (OpenAI Batch API request files)
  needs no `task` (its requests are the task) and writes `output.format:
  openai_batch` (the default for it); the keys that do not apply to it
  (`task`, `sampling`, `output.carry`, ...) and an openai_batch output of
  another input are refused, naming the key (`_check_formats`, the one place).
- `task.type: extract` takes a JSON schema (`schema` inline, or `schema_path`
  read once at load); its rules are in extract_config.py. `sampling_params()`
  is the job's SamplingParams: `sampling`, plus for extract the schema as the
  engine's JSON constraint (`structured_outputs`, a mapping in YAML).
- `result_fields(cfg)` is the part of the config that changes results; its
  hash is stored in the output manifest so a resume with another config is
  refused. It holds an extract schema as read (a schema_path's content), and
  the keys added for structured output only when set, so older outputs keep
  their hash.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import re
import typing
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, create_model, field_validator,
                      model_validator)

from batchlm.config import EngineConfig
from batchlm.pipelines.errors import ConfigError
from batchlm.sampling_params import SamplingParams

DEFAULT_MODEL = EngineConfig.model


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class InputConfig(_Section):
    format: Literal["parquet", "huggingface", "jsonl", "openai_batch"]  # openai_batch: OpenAI Batch API requests
    path: str
    split: str | None = None  # huggingface: which split (default: train, or the only one)
    columns: list[str] | None = None  # read only these (default: all)
    id_column: str | None = None  # default: a stable id "<file>#<row>"
    limit: int | None = Field(None, ge=1)  # the first N rows, in file and row order
    storage_options: dict[str, Any] = {}  # fsspec/s3fs options: endpoint_url, key, secret, ...


class Label(_Section):
    name: str
    description: str | None = None


_EXTRACT_KEYS = ("schema", "schema_path")  # absent from result_fields unless set (older outputs keep their hash)

with warnings.catch_warnings():
    # NOTE: a field named `schema` shadows BaseModel.schema (pydantic v1's deprecated method); the
    # YAML key is `schema`, as users write it.
    warnings.filterwarnings("ignore", message=".*shadows an attribute.*")

    class TaskConfig(_Section):
        type: Literal["generate", "classify", "extract"] = "generate"
        prompt: str  # Jinja template over the row's columns (sandboxed)
        system: str | None = None  # system message (also a template), chat models only
        chat_template: bool | None = None  # None: on when the model has a chat template
        labels: list[Label] | None = None  # classify: names, optionally with descriptions
        on_long_prompt: Literal["error", "truncate"] = "error"  # over max_model_len: record or keep the tail
        schema: dict[str, Any] | None = None  # extract: the JSON schema, inline
        schema_path: str | None = None  # extract: a JSON file holding it (local or s3://)
        _loaded: dict | None = PrivateAttr(None)  # schema_path's schema, read once at config load

        @property
        def json_schema(self) -> dict | None:
            """extract: the schema (inline, or read from schema_path at config load); else None."""
            return self.schema if self.schema is not None else self._loaded

        @field_validator("labels", mode="before")
        @classmethod
        def _names(cls, v):
            return [{"name": x} if isinstance(x, str) else x for x in v] if isinstance(v, list) else v

        @model_validator(mode="after")
        def _labels_match_type(self):
            if self.type == "classify" and (not self.labels or len(self.labels) < 2):
                raise ValueError("task.labels: classify needs at least two labels")
            if self.type != "classify" and self.labels:
                raise ValueError("task.labels: only a classify task takes labels (set task.type: classify)")
            given = [k for k in _EXTRACT_KEYS if getattr(self, k) is not None]
            if self.type != "extract" and given:
                raise ValueError(f"task.{given[0]}: only an extract task takes a schema (set task.type: extract)")
            if self.type == "extract" and len(given) != 1:
                raise ValueError("task.schema: an extract task needs exactly one of schema (inline) and "
                                 f"schema_path (a JSON file); {'both are' if given else 'neither is'} set")
            if self.schema is not None:
                from batchlm.pipelines.extract import check_schema

                check_schema(self.schema, "task.schema")
            if self.labels and len({lb.name for lb in self.labels}) != len(self.labels):
                raise ValueError("task.labels: label names must be distinct")
            return self


def _dataclass_rules(section: str, build) -> None:
    """Run a dataclass's own validation; restate its error under the YAML section."""
    try:
        build()
    except (ValueError, TypeError) as e:
        text = str(e).removeprefix("SamplingParams.").replace("StructuredOutputsParams.", "structured_outputs.", 1)
        field, _, rest = text.partition(" ")
        raise ValueError(f"{section}.{field}: {rest}") from None


def _section_from_dataclass(name: str, cls, rename: dict[str, str], types: dict | None = None) -> type[BaseModel]:
    """A YAML section with one key per dataclass field; `types` replaces a field's type (YAML-shaped)."""
    hints = {**typing.get_type_hints(cls), **(types or {})}
    fields = {rename.get(f.name, f.name): (hints[f.name], f.default) for f in dataclasses.fields(cls)}
    return create_model(name, __base__=_Section, **fields)


# YAML `model.name` is EngineConfig.model (`model.model` would read badly).
_ModelBase = _section_from_dataclass("ModelConfig", EngineConfig, {"model": "name"})
# NOTE: in YAML, structured_outputs is a mapping (json/regex/choice/grammar); the engine takes that too.
_SamplingBase = _section_from_dataclass("SamplingConfig", SamplingParams, {},
                                        {"structured_outputs": dict[str, Any] | None})
_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object")


class ModelConfig(_ModelBase):
    @model_validator(mode="after")
    def _engine_rules(self):
        _dataclass_rules("model", self.engine_kwargs)
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `batchlm.LLM` (EngineConfig field names)."""
        d = self.model_dump()
        d["model"] = d.pop("name")
        EngineConfig(**d)
        return d


class SamplingConfig(_SamplingBase):
    @model_validator(mode="after")
    def _sampling_rules(self):
        if self.n != 1:
            raise ValueError("sampling.n: the batch job writes one completion per row; use n: 1")
        so = getattr(self, "structured_outputs", None)
        if (so is not None and set(so) <= set(_CONSTRAINTS)  # an unknown key: the engine names it
                and len([k for k in _CONSTRAINTS if so.get(k) not in (None, False)]) != 1):
            raise ValueError(f"sampling.structured_outputs: exactly one of {', '.join(_CONSTRAINTS)} "
                             f"(got {', '.join(map(str, so)) or 'none'})")
        _dataclass_rules("sampling", self.params)
        return self

    def params(self) -> SamplingParams:
        return SamplingParams(**self.model_dump())


class Replicas(_Section):
    min: int = Field(ge=1)
    max: int = Field(ge=1)


class ResourcesConfig(_Section):
    replicas: Replicas = Replicas(min=1, max=1)  # engine actors: a number, or {min, max} to autoscale
    gpus_per_replica: float = Field(0, ge=0)  # 0: run the engine on CPUs
    cpus_per_replica: float = Field(1, gt=0)  # on CPU also the engine's thread count
    batch_size: int = Field(256, ge=1)  # rows per engine call: keep continuous batching full

    @field_validator("replicas", mode="before")
    @classmethod
    def _fixed(cls, v):
        return {"min": v, "max": v} if isinstance(v, int) and not isinstance(v, bool) else v

    def replica_range(self) -> tuple[int, int]:
        return self.replicas.min, max(self.replicas.min, self.replicas.max)


class OutputConfig(_Section):
    format: Literal["parquet", "openai_batch"] | None = None  # None: openai_batch for that input, else parquet
    path: str
    rows_per_shard: int = Field(1000, ge=1)  # the unit of work, commit and resume
    compression: Literal["zstd", "snappy", "gzip", "lz4", "brotli", "none"] = "zstd"
    carry: list[str] = []  # input columns copied to the output
    storage_options: dict[str, Any] = {}
    on_error: Literal["record", "fail"] = "record"


class JobConfig(_Section):
    input: InputConfig
    task: TaskConfig | None  # required, except with an openai_batch input (its requests are the task)
    model: ModelConfig = ModelConfig()
    sampling: SamplingConfig = SamplingConfig()
    resources: ResourcesConfig = ResourcesConfig()
    output: OutputConfig

    @field_validator("model", mode="before")
    @classmethod
    def _model_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="before")
    @classmethod
    def _no_task_for_openai_batch(cls, data):
        inp = data.get("input") if isinstance(data, dict) else None
        if isinstance(inp, dict) and inp.get("format") == "openai_batch" and "task" not in data:
            return {**data, "task": None}
        return data

    @model_validator(mode="after")
    def _format_rules(self):
        _check_formats(self)
        if self.task is not None and self.task.type == "extract":
            from batchlm.pipelines.extract_config import check_extract

            check_extract(self)
        return self

    def sampling_params(self) -> SamplingParams:
        """The job's SamplingParams: `sampling`, and for extract the schema's JSON constraint."""
        params = self.sampling.params()
        if self.task is not None and self.task.type == "extract":
            params = params.clone(structured_outputs={"json": self.task.json_schema})
        return params

    @property
    def output_format(self) -> str:
        """The output's format: `output.format`, by default openai_batch for an openai_batch input."""
        return self.output.format or ("openai_batch" if self.input.format == "openai_batch" else "parquet")


def _check_formats(cfg: JobConfig) -> None:
    """Which sections and keys go with which input and output formats (one place for these rules)."""
    batch_in, batch_out = cfg.input.format == "openai_batch", cfg.output_format == "openai_batch"
    if not batch_in:
        if batch_out:
            raise ValueError(f"output.format: openai_batch output answers OpenAI Batch requests; it needs "
                             f"input.format: openai_batch (this input is {cfg.input.format}); use output.format: "
                             "parquet")
        if cfg.task is None:
            raise ValueError("task: required key is missing (only an openai_batch input needs no task)")
        return
    if not batch_out:
        raise ValueError("output.format: an openai_batch input writes openai_batch output (one response line "
                         "per request); drop output.format or set it to openai_batch")
    refused = [
        ("task", cfg.task is not None, "each request's body is its own task (messages or prompt); remove the "
                                       "task section"),
        ("sampling", "sampling" in cfg.model_fields_set, "each request's body holds its own sampling fields; "
                                                         "remove the sampling section"),
        ("input.id_column", cfg.input.id_column is not None, "each request's custom_id is its id"),
        ("input.columns", cfg.input.columns is not None, "a request line is read whole"),
        ("output.carry", bool(cfg.output.carry), "an output line holds only the Batch API's fields"),
        ("output.compression", "compression" in cfg.output.model_fields_set,
         "openai_batch shards are plain JSON Lines"),
    ]
    for key, bad, why in refused:
        if bad:
            raise ValueError(f"{key}: not used with input.format openai_batch: {why}")


# Engine options that change speed or memory, never the text produced.
_PERF_ONLY_MODEL_FIELDS = {
    "device", "max_num_seqs", "max_num_batched_tokens", "block_size", "enable_prefix_caching",
    "enable_chunked_prefill", "kv_cache_memory", "gpu_memory_utilization", "attention_backend",
    "compile_model", "enforce_eager",
}


def result_fields(cfg: JobConfig) -> dict[str, Any]:
    """The config fields that change what the output holds (secrets excluded)."""
    inp = cfg.input.model_dump(exclude={"storage_options"})
    model = {k: v for k, v in cfg.model.model_dump().items() if k not in _PERF_ONLY_MODEL_FIELDS}
    out = {"carry": list(cfg.output.carry), "rows_per_shard": cfg.output.rows_per_shard}
    if cfg.output_format != "parquet":  # NOTE: absent for parquet, so older outputs keep their hash
        out["format"] = cfg.output_format
    task = None
    if cfg.task is not None:
        task = {k: v for k, v in cfg.task.model_dump().items() if not (k in _EXTRACT_KEYS and v is None)}
        if cfg.task.schema_path is not None:  # the file's schema as read: a changed file is a changed config
            task["schema"] = cfg.task.json_schema
    sampling = cfg.sampling.model_dump()
    if sampling.get("structured_outputs", 0) is None:  # NOTE: absent unless set, so older outputs keep their hash
        del sampling["structured_outputs"]
    return {"input": inp, "task": task, "model": model, "sampling": sampling, "output": out}


def config_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted-path lines saying what differs between two result_fields dicts."""
    lines = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += diff_fields(a, b, path + ".")
        elif a != b:
            lines.append(f"  {path}: output has {a!r}, this config has {b!r}")
    return lines


# --- loading ---------------------------------------------------------------

# NOTE: a YAML alias loads as its anchor's own object, shared: a few hundred
# bytes of nested aliases expand to billions of values for any code that
# copies the tree. Loading refuses a config past this many expanded values
# before anything copies it.
MAX_CONFIG_VALUES = 100_000

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no code tags) that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(self, node, deep)
        return super().construct_mapping(node, deep=deep)


def _refuse_duplicate_keys(loader: _StrictLoader, node: yaml.MappingNode, deep: bool) -> None:
    first: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue  # `<<: *base` is meant to be overridden by the keys beside it
        key = loader.construct_object(key_node, deep=deep)
        try:
            seen = first.setdefault(key, key_node)
        except TypeError:  # an unhashable key: SafeLoader reports it
            continue
        if seen is not key_node:
            line, first_line = key_node.start_mark.line + 1, seen.start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} on line {line} (first on line {first_line})")


def _expanded_size(node, memo: dict[int, int | None]) -> int:
    """How many values `node` holds once YAML aliases are expanded.

    Each shared object is walked once (memo on id()) and its count reused, so
    this is linear in the YAML's size however far the aliases expand.
    """
    if not isinstance(node, (dict, list)):
        return 1
    if id(node) in memo:
        if memo[id(node)] is None:
            raise ConfigError("a YAML alias is used inside its own anchor (the config refers to itself)")
        return memo[id(node)]
    memo[id(node)] = None  # in progress: meeting it again is a cycle
    total = 1
    for child in node.values() if isinstance(node, dict) else node:
        total += _expanded_size(child, memo)
        if total > MAX_CONFIG_VALUES:
            raise ConfigError(f"the config expands to too many values (over {MAX_CONFIG_VALUES} "
                              "once its YAML aliases are expanded); check the anchors (&name) and aliases (*name)")
    memo[id(node)] = total
    return total


def _interpolate(node, path: str):
    if isinstance(node, dict):
        return {k: _interpolate(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]") for i, v in enumerate(node)]
    if isinstance(node, str):
        def sub(m):
            if m.group(1) not in os.environ:
                raise ConfigError(f"{path}: environment variable {m.group(1)} is not set")
            return os.environ[m.group(1)]

        return _ENV.sub(sub, node)
    return node


def apply_override(raw: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected dotted.key=value, e.g. sampling.max_tokens=64")
    *parents, leaf = key.strip().split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {p} is not a section")
    try:
        node[leaf] = yaml.load(value, Loader=_StrictLoader) if value.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {key.strip()}: the value is not valid YAML") from None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = JobConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        args = [a for a in typing.get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]
        args += [a for arg in typing.get_args(ann) for a in typing.get_args(arg)
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (args[0] if args else None)
    return model


def _format_error(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in ("function-after",))))
    path = ".".join(str(p) for p in loc) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{path}: unknown key; {hint}allowed keys here: {', '.join(allowed)}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not loc or msg.startswith(path.split(".")[0] + "."):  # a whole-config rule names its own key
        return msg
    return f"{path}: {msg}"


def parse_config(raw: Any, source: str = "config") -> JobConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections input, task, output, ...")
    try:
        _expanded_size(raw, {})
        raw = _interpolate(raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        lines = [_format_error(err) for err in e.errors(include_input=False)]
        lines = list(dict.fromkeys(lines))
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines)) from None


def _first_bad_utf8_line(path: str) -> int:
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return data.count(b"\n", 0, e.start) + 1
    return 1


def _read_yaml(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text (line {_first_bad_utf8_line(path)}); "
                          "save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config: {e.strerror}") from None
    except RecursionError:
        raise ConfigError(f"{path}: the YAML is nested too deeply") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


def load_config(path: str, overrides: typing.Iterable[str] = ()) -> JobConfig:
    raw = _read_yaml(path)
    raw = raw if raw is not None else {}
    for o in overrides:
        if not isinstance(raw, dict):
            break
        apply_override(raw, o)
    return parse_config(raw, path)
