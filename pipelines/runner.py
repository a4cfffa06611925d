"""`batchlm run`: plan, resume, stream through Ray Data, commit shards, summarize.

Contract
--------
`run_job(cfg, overwrite=False, stream=sys.stderr) -> RunResult`

1. Plan the input into work units (sources.plan_units) and open the output
   (manifest.open_output): temp files cleaned, a different config or input
   refused, committed units (shards present) known.
2. Only uncommitted units go through Ray Data: `from_items(units)` ->
   `read_render` tasks -> `EngineStage` actor pool (one engine per actor,
   `resources.batch_size` rows per engine call, GPUs when asked; a cluster
   without them fails at once with a ConfigError).
3. The driver alone writes: it groups result rows by unit and, when a unit
   is complete, commits its shard atomically, then the manifest. `_SUCCESS`
   is written when every unit is committed. A crash loses only the units in
   flight; rerunning the command finishes the rest, each row exactly once.
4. With `output.on_error: fail` the first failed row raises RowFailed.

`BATCHLM_UNIT_TRACE=/path` makes every engine actor append one JSON line per
(unit, rows) it generates: a debugging aid that tests use to prove committed
units are never generated again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

from batchlm.pipelines.config import JobConfig, result_fields
from batchlm.pipelines.errors import ConfigError, RowFailed
from batchlm.pipelines.manifest import SUCCESS, UnitRecord, encode_shard, open_output, shard_name
from batchlm.pipelines.progress import Progress, summary
from batchlm.pipelines.sources import Unit, plan_units, read_unit
from batchlm.pipelines.stages import EngineStage, output_columns, read_render
from batchlm.pipelines.storage import Store


@dataclass
class RunResult:
    complete: bool
    rows: int
    total_rows: int
    generated_rows: int
    errors: int
    input_tokens: int
    output_tokens: int
    wall: float
    output: str


def plan_fingerprint(units: list[Unit]) -> str:
    key = json.dumps([(u.name, u.start, u.stop) for u in units])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def id_column_name(cfg: JobConfig) -> str:
    return cfg.input.id_column or "id"


def check_columns(cfg: JobConfig, first_rows: list[dict]) -> list[str]:
    """Checks carried columns against the input and the output's own columns; returns carry."""
    from batchlm.pipelines.render import PromptTemplate

    id_name = id_column_name(cfg)
    reserved = set(output_columns(cfg.task.type)) | {"__unit", "__row"}
    if id_name in reserved:
        raise ConfigError(f"input.id_column: {id_name!r} clashes with an output column; rename it")
    carry = [c for c in dict.fromkeys(cfg.output.carry) if c != id_name]
    clash = [c for c in carry if c in reserved]
    if clash:
        raise ConfigError(f"output.carry: {', '.join(clash)} would overwrite output columns")
    seen = set().union(*(r.keys() for r in first_rows)) - {"__id", "__error"}
    missing = [c for c in carry if c not in seen]
    if missing:
        raise ConfigError(f"output.carry: no column(s) {', '.join(missing)} in the input; "
                          f"columns: {', '.join(sorted(seen))}")
    unknown = [f for f in PromptTemplate(cfg.task).fields() if f not in seen]
    if unknown and cfg.input.format != "jsonl":
        raise ConfigError(f"task.prompt: uses {', '.join(unknown)}, not in the input; "
                          f"columns: {', '.join(sorted(seen))}")
    return carry


def init_ray(cfg: JobConfig) -> bool:
    """Connects to RAY_ADDRESS or starts a local Ray; True when it started one."""
    import ray

    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
        return False
    ncpu = os.cpu_count() or 1
    # address="local": always a fresh embedded Ray, never a `ray start` cluster found on this machine
    ray.init(address="local", num_cpus=ncpu, num_gpus=_local_gpus(), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, configure_logging=True)
    return True


def _local_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        return 0


def check_resources(cfg: JobConfig) -> None:
    import ray

    res = ray.cluster_resources()
    lo, _ = cfg.resources.replica_range()
    need = {"GPU": cfg.resources.gpus_per_replica * lo, "CPU": cfg.resources.cpus_per_replica * lo}
    for kind, amount in need.items():
        have = res.get(kind, 0)
        if amount > have:
            hint = " (set resources.gpus_per_replica: 0 to run on CPUs)" if kind == "GPU" else ""
            raise ConfigError(f"resources: {lo} replica(s) need {amount:g} {kind}s but the cluster has "
                              f"{have:g}{hint}")


def build_dataset(cfg: JobConfig, todo: list[Unit], carry: list[str], trace_path: str | None):
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # NOTE: our own progress line replaces Ray Data's per-operator bars.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    lo, hi = cfg.resources.replica_range()
    res = cfg.resources
    ds = ray.data.from_items([u.to_dict() for u in todo], override_num_blocks=len(todo))
    # NOTE: read+render asks for no CPU slot, so it can never wait behind engine
    # actors that take every CPU (a 2-core laptop with cpus_per_replica: 2);
    # two such tasks at a time keep the engine fed without reading ahead of it.
    ds = ds.map_batches(
        read_render, batch_size=1, batch_format="pyarrow", num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=min(2, len(todo))),
        fn_kwargs=dict(input_cfg=cfg.input, task_cfg=cfg.task, id_name=id_column_name(cfg), carry=carry))
    return ds.map_batches(
        EngineStage, batch_size=res.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_gpus=res.gpus_per_replica or None, num_cpus=res.cpus_per_replica,
        fn_constructor_kwargs=dict(
            engine_kwargs=cfg.model.engine_kwargs(), params=cfg.sampling.params(), task_type=cfg.task.type,
            labels=[lb.name for lb in cfg.task.labels or []], chat_template=cfg.task.chat_template,
            on_long_prompt=cfg.task.on_long_prompt,
            threads=max(1, int(res.cpus_per_replica)) if not res.gpus_per_replica else None,
            trace_path=trace_path))


class _UnitBuffer:
    """Result rows of in-flight units, until each unit is complete."""

    def __init__(self, sizes: dict[int, int]):
        self.sizes = sizes
        self.parts: dict[int, list] = {}
        self.count: dict[int, int] = {}

    def add(self, table) -> list[int]:
        import pyarrow.compute as pc

        done = []
        for unit in pc.unique(table["__unit"]).to_pylist():
            part = table.filter(pc.equal(table["__unit"], unit))
            self.parts.setdefault(unit, []).append(part)
            self.count[unit] = self.count.get(unit, 0) + part.num_rows
            if self.count[unit] == self.sizes[unit]:
                done.append(unit)
        return done

    def pop(self, unit: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        t = pa.concat_tables(self.parts.pop(unit), promote_options="permissive")
        del self.count[unit]
        return t.take(pc.sort_indices(t["__row"])).drop_columns(["__unit", "__row"])


def _record(table) -> UnitRecord:
    import pyarrow.compute as pc

    def total(col):
        return int(pc.sum(table[col]).as_py() or 0)

    return UnitRecord(rows=table.num_rows, errors=table.num_rows - table["error"].null_count,
                      input_tokens=total("num_input_tokens"), output_tokens=total("num_output_tokens"))


def _first_error(table, id_name: str) -> tuple[str, str] | None:
    """(row id, error) of the first failed row, or None."""
    import pyarrow.compute as pc

    bad = table.filter(pc.is_valid(table["error"]))
    return (bad[id_name][0].as_py(), bad["error"][0].as_py()) if bad.num_rows else None


def run_job(cfg: JobConfig, overwrite: bool = False, stream=None) -> RunResult:
    stream = stream or sys.stderr
    t0 = time.monotonic()
    plan = plan_units(cfg.input, cfg.output.rows_per_shard)
    carry = check_columns(cfg, read_unit(cfg.input, plan[0]))
    total_rows = sum(u.num_rows for u in plan)
    store = Store(cfg.output.path, cfg.output.storage_options)
    manifest = open_output(store, result_fields(cfg), plan_fingerprint(plan), len(plan), total_rows, overwrite)
    todo = [u for u in plan if u.index not in manifest.units]
    manifest.runs.append({"started": time.time(), "units_skipped": len(plan) - len(todo), "units_todo": len(todo)})
    manifest.save(store)
    print(f"batchlm run: {total_rows} rows in {len(plan)} units; {len(plan) - len(todo)} units already "
          f"committed; output {store.where()}", file=stream)
    progress = Progress(total_rows, manifest.rows_done, stream)
    id_name = id_column_name(cfg)
    examples: list[str] = []
    generated = 0
    if todo:
        started_ray = init_ray(cfg)
        try:
            check_resources(cfg)
            ds = build_dataset(cfg, todo, carry, os.environ.get("BATCHLM_UNIT_TRACE"))
            buffer = _UnitBuffer({u.index: u.num_rows for u in todo})
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
                failed = _first_error(batch, id_name) if cfg.output.on_error == "fail" else None
                if failed:
                    raise RowFailed(*failed)
                for unit in buffer.add(batch):
                    table = buffer.pop(unit)
                    rec = _record(table)
                    store.write_atomic(shard_name(unit), encode_shard(table, rec, cfg.output.compression))
                    manifest.units[unit] = rec
                    manifest.save(store)
                    generated += rec.rows
                    if rec.errors and len(examples) < 5:
                        examples.append("{}: {}".format(*_first_error(table, id_name)))
                    progress.update(rec.rows, rec.errors, rec.input_tokens, rec.output_tokens)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    complete = len(manifest.units) == len(plan)
    totals = manifest.totals()
    wall = time.monotonic() - t0
    manifest.runs[-1].update(finished=time.time(), wall=round(wall, 3), rows_generated=generated)
    manifest.save(store)
    if complete:
        store.write_atomic(SUCCESS, json.dumps({"rows": totals.rows, "errors": totals.errors}).encode())
    result = RunResult(complete, totals.rows, total_rows, generated, totals.errors, totals.input_tokens,
                       totals.output_tokens, wall, store.where())
    print(summary(rows=totals.rows, total=total_rows, errors=totals.errors, error_examples=examples,
                  in_tok=totals.input_tokens, out_tok=totals.output_tokens, wall=wall,
                  generated_rows=generated, run_in_tok=progress.in_tok, run_out_tok=progress.out_tok,
                  where=store.where(), complete=complete), file=stream)
    return result
