"""The extract task's config rules, run when a job config loads (JobConfig's validator).

Contract
--------
- `check_extract(cfg)` for a config whose task is extract: reads `task.schema_path` (through the
  storage layer, with `input.storage_options`; JSON, at most MAX_SCHEMA_BYTES) into the task,
  checks the schema (extract.check_schema), refuses `sampling.structured_outputs` (the schema is
  the constraint) and property names that would overwrite the id column, a carried column or a
  standard output column, and builds the job's SamplingParams so the engine's grammar compiler
  checks the schema too. Every problem is a ValueError naming the config key (pydantic reports it
  as a config error: exit 2 before Ray starts).
"""
from __future__ import annotations

import json

from batchlm.pipelines.errors import ConfigError

# The largest schema_path file read (a schema is a few KB; this guards against pointing at data).
MAX_SCHEMA_BYTES = 1 << 20


def read_schema(path: str, storage_options: dict) -> dict:
    """task.schema_path's JSON, through the storage layer (input.storage_options for s3://)."""
    from batchlm.pipelines.storage import make_fs, store_errors

    where = f"task.schema_path {path}"
    try:
        with store_errors(where):
            fs, p = make_fs(path, storage_options)
            size = fs.size(p)
            if size > MAX_SCHEMA_BYTES:
                raise ConfigError(f"{where}: {size} bytes; a schema file is at most {MAX_SCHEMA_BYTES}")
            text = fs.cat_file(p).decode("utf-8")
        return json.loads(text)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    except ValueError as e:  # JSONDecodeError
        raise ValueError(f"{where}: not a JSON file: {e}") from None


def check_extract(cfg) -> None:
    """An extract task's schema: read, checked, its columns free, and the engine's own rules."""
    from batchlm.pipelines.extract import check_schema, column_names
    from batchlm.pipelines.stages import output_columns

    task = cfg.task
    where = "task.schema" if task.schema is not None else f"task.schema_path {task.schema_path}"
    if task.schema_path is not None:
        task._loaded = read_schema(task.schema_path, cfg.input.storage_options)
        check_schema(task._loaded, where)
    if getattr(cfg.sampling, "structured_outputs", None) is not None:
        raise ValueError("sampling.structured_outputs: an extract task constrains output by its task.schema; "
                         "remove sampling.structured_outputs")
    id_name = cfg.input.id_column or "id"
    taken = {name: "a standard output column" for name in output_columns("generate")}
    taken.update({c: "a carried column (output.carry)" for c in cfg.output.carry})
    taken[id_name] = f"the job's id column ({'input.id_column' if cfg.input.id_column else 'default id'})"
    for name in column_names(task.json_schema):
        if name in taken:
            raise ValueError(f"{where}: property {name!r} would be written over {taken[name]}; rename the "
                             "property (or the other column)")
    try:
        cfg.sampling_params()  # the engine's own check: the schema compiles to a grammar
    except (ValueError, TypeError) as e:
        why = str(e).removeprefix("StructuredOutputsParams.json is not valid: ")
        raise ValueError(f"{where}: the engine cannot constrain output to this schema: {why}") from None
