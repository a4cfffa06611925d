"""Shared helpers for pipeline tests: configs, the CLI in a subprocess, outputs."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "examples" / "data" / "python_docs.parquet"
CLI = [sys.executable, "-m", "batchlm"]


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_job(model_dir: str, out: str, **over) -> dict:
    """A small generate job on the quickstart data with the tiny random model."""
    base = {
        "input": {"format": "parquet", "path": str(DOCS), "limit": 40},
        "task": {"prompt": "Summarize: {{ text[:120] }}"},
        "model": {"name": model_dir, "max_model_len": 256, "kv_cache_memory": 1 << 24},
        "sampling": {"temperature": 0.0, "max_tokens": 8},
        "resources": {"batch_size": 16, "cpus_per_replica": 1},
        "output": {"path": out, "rows_per_shard": 10, "carry": ["topic"]},
    }
    return deep_merge(base, over)


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def cli(*args, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO, **kw)


def read_output(path: str, storage_options: dict | None = None):
    import pyarrow.parquet as pq

    from batchlm.pipelines.storage import make_fs

    fs, root = make_fs(path, storage_options)
    files = sorted(f for f in fs.ls(root, detail=False) if f.rsplit("/", 1)[-1].startswith("part-"))
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files]) if files else None


def input_ids(limit: int) -> list[str]:
    return [f"python_docs.parquet#{i}" for i in range(limit)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendered_rows(cfg):
    """All the job's input rows through the read stage (read, render, tokenize), in process (no
    Ray): what the engine stage receives."""
    import pyarrow as pa

    from batchlm.pipelines.runner import id_column_name
    from batchlm.pipelines.sources import plan_units
    from batchlm.pipelines.stages import ReadRender

    units = plan_units(cfg.input, cfg.output.rows_per_shard)
    return ReadRender(cfg, id_column_name(cfg), [])(pa.Table.from_pylist([u.to_dict() for u in units]))


def run_engine_stage(stage, batch):
    """One EngineStage call, in process (its __call__ is async, as Ray Data runs it)."""
    import asyncio

    return asyncio.run(stage(batch))
