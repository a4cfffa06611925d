"""`batchlm run`: plan, resume, stream through Ray Data, commit shards, summarize.

Contract
--------
`run_job(cfg, overwrite=False, stream=sys.stderr, verbose=False) -> RunResult`

1. Before Ray starts (`prepare`): plan the input into work units with each
   file's identity and unique ids (sources.plan_input), check the columns the
   config names and that the model resolves; every problem is a ConfigError.
   Then the output: its location is checked (output.check_location), this run
   takes the output's lease (lease.py: one writer per output) and opens it
   (output.open_output): temp files cleaned, damaged shards moved aside, a
   different config or changed input refused, intact committed units known.
2. Only uncommitted units go through Ray Data: `from_items(units)` ->
   `ReadRender` CPU actors (read, render, tokenize: the tokenizer only) ->
   `EngineStage` actor pool (one engine per actor fed token ids,
   `resources.batch_size` rows per call, two calls at once so the engine
   never drains between batches, GPUs when asked; a cluster without them
   fails at once with a ConfigError). An openai_batch input
   goes through `read_requests` tasks -> `BatchEngineStage` instead, with
   the custom_ids used twice found once over the whole plan (`prepare`).
3. The driver alone writes: it groups result rows by unit and, when a unit
   is complete, commits its shard atomically, then the manifest (Committer).
   `_SUCCESS` is written when every unit is committed and not every row
   failed (a run whose rows all failed is incomplete: exit 1). A crash loses only the units in
   flight; rerunning the command finishes the rest, each row exactly once.
4. With `output.on_error: fail` the first failed row raises RowFailed.
5. What the person sees (progress.py): notes as Ray and the engines start, then a live
   progress line fed by the engines while they generate (live.py), then the summary. Ray's
   own log lines are quiet unless `verbose` (raylogs.py).

`BATCHLM_UNIT_TRACE=/path` makes every engine actor append one JSON line per
(unit, rows) it generates: a debugging aid that tests use to prove committed
units are never generated again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from batchlm.pipelines.config import JobConfig, result_fields
from batchlm.pipelines.errors import ConfigError, RowFailed, StageFailed
from batchlm.pipelines.lease import Lease
from batchlm.pipelines.manifest import (SUCCESS, Manifest, ShardFooter, UnitRecord, encode_jsonl_shard, encode_shard,
                                        write_shard)
from batchlm.pipelines.output import Expected, check_location, open_output
from batchlm.pipelines.progress import Progress, summary
from batchlm.pipelines.sources import InputPlan, Unit, plan_input, read_unit
from batchlm.pipelines.stages import EngineStage, ReadRender, output_columns
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
    reserved = set(output_columns(cfg.task.type, cfg.task.json_schema)) | {"__unit", "__row"}
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


def ray_where() -> str:
    """Where init_ray will run the job, for the start-up note."""
    address = os.environ.get("RAY_ADDRESS")
    return f"the Ray cluster at {address}" if address else f"a local Ray ({os.cpu_count() or 1} CPUs)"


def init_ray(cfg: JobConfig, verbose: bool = False) -> bool:
    """Connects to RAY_ADDRESS or starts a local Ray; True when it started one. Ray's own log
    lines are quiet unless `verbose` (raylogs.py)."""
    import ray

    from batchlm.pipelines import raylogs

    opts = raylogs.init_kwargs(verbose)
    logging.getLogger("ray").setLevel(opts["logging_level"])
    if ray.is_initialized():
        return False
    # NOTE: ray.init installs its own SIGTERM handler (exit 1 with stack dumps); the CLI's handler,
    # which stops the run like Ctrl-C, is put back afterwards.
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        with raylogs.quiet_init(verbose):
            if os.environ.get("RAY_ADDRESS"):
                ray.init(**opts)
                return False
            ncpu = os.cpu_count() or 1
            # address="local": always a fresh embedded Ray, never a `ray start` cluster found on this machine
            ray.init(address="local", num_cpus=ncpu, num_gpus=_local_gpus(), include_dashboard=False,
                     configure_logging=True, **opts)
        return True
    finally:
        if threading.current_thread() is threading.main_thread() and on_term is not None:
            signal.signal(signal.SIGTERM, on_term)


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


def build_dataset(cfg: JobConfig, todo: list[Unit], carry: list[str], trace_path: str | None,
                  duplicates: dict[str, str] | None = None, progress_sink=None, verbose: bool = False):
    import ray
    import ray.data

    from batchlm.pipelines.raylogs import quiet_ray_data

    quiet_ray_data(verbose)
    ctx = ray.data.DataContext.get_current()
    # NOTE: our own progress line replaces Ray Data's per-operator bars.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    lo, hi = cfg.resources.replica_range()
    res = cfg.resources
    ds = ray.data.from_items([u.to_dict() for u in todo], override_num_blocks=len(todo))
    # NOTE: both engine stages' __call__ is async (engine_loop.EngineLoop); two calls at once per
    # actor put the next batch's requests into the engine before the current batch's last ones finish.
    engine = dict(batch_size=res.batch_size, batch_format="pyarrow",
                  num_gpus=res.gpus_per_replica or None, num_cpus=res.cpus_per_replica,
                  compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=2))
    if cfg.input.format == "openai_batch":
        from batchlm.pipelines.openai_requests import read_requests
        from batchlm.pipelines.openai_responses import BatchEngineStage

        # NOTE: read tasks ask for no CPU slot, so they can never wait behind engine actors that
        # take every CPU (a 2-core laptop with cpus_per_replica: 2).
        ds = ds.map_batches(read_requests, batch_size=1, batch_format="pyarrow", num_cpus=0,
                            compute=ray.data.TaskPoolStrategy(size=min(2, len(todo))), fn_kwargs=dict(
                                input_cfg=cfg.input, duplicates=duplicates or {}, default_model=cfg.model.name,
                                id_name=id_column_name(cfg)))
        return ds.map_batches(BatchEngineStage, **engine,
                              fn_constructor_kwargs=dict(engine_kwargs=cfg.model.engine_kwargs(),
                                                         threads=engine_threads(cfg), trace_path=trace_path,
                                                         progress_sink=progress_sink))
    # NOTE: read+render+tokenize asks for no CPU slot either; its actors load the tokenizer
    # once (never the model), and two of them keep the engine fed without reading far ahead of it.
    ds = ds.map_batches(
        ReadRender, batch_size=1, batch_format="pyarrow", num_cpus=0,
        compute=ray.data.ActorPoolStrategy(size=min(2, len(todo))),
        fn_constructor_kwargs=dict(cfg=cfg, id_name=id_column_name(cfg), carry=carry))
    return ds.map_batches(EngineStage, **engine,
                          fn_constructor_kwargs=engine_stage_kwargs(cfg, trace_path, progress_sink))


def engine_threads(cfg: JobConfig) -> int | None:
    """An engine actor's torch threads: its CPUs when it runs on CPUs, else torch's default."""
    res = cfg.resources
    return max(1, int(res.cpus_per_replica)) if not res.gpus_per_replica else None


def engine_stage_kwargs(cfg: JobConfig, trace_path: str | None = None, progress_sink=None) -> dict:
    """EngineStage's constructor arguments for this job (the run's, and tests' in-process stages)."""
    return dict(
        engine_kwargs=cfg.model.engine_kwargs(), params=cfg.sampling_params(), task_type=cfg.task.type,
        labels=[lb.name for lb in cfg.task.labels or []], threads=engine_threads(cfg), trace_path=trace_path,
        progress_sink=progress_sink, schema=cfg.task.json_schema)


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


def _first_error(table, id_name: str) -> tuple[str, str] | None:
    """(row id, error) of the first failed row, or None."""
    import pyarrow.compute as pc

    bad = table.filter(pc.is_valid(table["error"]))
    return (bad[id_name][0].as_py(), bad["error"][0].as_py()) if bad.num_rows else None


@dataclass(frozen=True)
class PreparedJob:
    """Everything decided before Ray starts: the plan, the carried columns, what the output must hold."""
    plan: InputPlan
    carry: list[str]
    expected: Expected
    duplicates: dict[str, str] = field(default_factory=dict)  # openai_batch: line -> earlier line, same custom_id


def check_model(cfg: JobConfig) -> None:
    """The model (and a draft model) resolves and has a config, in the driver, before any actor starts."""
    from batchlm.models.loader import load_config
    from batchlm.models.resolve import resolve_model

    try:
        model_dir, _ = resolve_model(cfg.model.name, weights=False)  # config and tokenizer only
        load_config(model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name: {e}") from None
    spec = cfg.model.speculative_config
    if spec and spec.get("method") == "draft":  # the draft model too (its shape is already validated)
        try:
            load_config(resolve_model(spec["model"], weights=False)[0])
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.speculative_config.model: {e}") from None


def prepare(cfg: JobConfig, stream=None) -> PreparedJob:
    """The plan and every check before Ray; the first line goes to `stream` once the input is known
    good (within a second or two), before the slower model check."""
    plan = plan_input(cfg.input, cfg.output.rows_per_shard)
    if cfg.input.format == "openai_batch":  # the requests are the task: no prompt columns to check
        from batchlm.pipelines.openai_requests import find_duplicates

        carry, duplicates = [], find_duplicates(cfg.input, plan.units)
    else:
        carry, duplicates = check_columns(cfg, read_unit(cfg.input, plan.units[0])), {}
    if stream is not None:
        print(f"batchlm run: {plan.total_rows} rows in {len(plan.units)} units from {cfg.input.path}; "
              f"checking the model {cfg.model.name}", file=stream, flush=True)
    check_model(cfg)
    expected = Expected(result_fields(cfg), plan_fingerprint(plan.units), len(plan.units), plan.total_rows,
                        dict(plan.files), tuple(u.name for u in plan.units), cfg.output_format)
    return PreparedJob(plan, carry, expected, duplicates)


class Committer:
    """The driver's only way to write: one shard per complete unit, then the manifest."""

    def __init__(self, store: Store, manifest: Manifest, expected: Expected, compression: str, lease: Lease):
        self.store, self.manifest, self.expected = store, manifest, expected
        self.compression, self.lease = compression, lease

    def commit(self, unit: int, table) -> UnitRecord:
        import pyarrow.compute as pc

        self.lease.check()

        def total(col):
            return int(pc.sum(table[col]).as_py() or 0)

        footer = ShardFooter(rows=table.num_rows, errors=table.num_rows - table["error"].null_count,
                             input_tokens=total("num_input_tokens"), output_tokens=total("num_output_tokens"),
                             config_hash=self.expected.config_hash, plan=self.expected.plan,
                             source=self.expected.source(unit))
        fmt = self.expected.shard_format
        if fmt == "parquet":
            data = encode_shard(table, footer, self.compression)
        else:
            from batchlm.pipelines.openai_responses import LINE_COLUMN

            data = encode_jsonl_shard(table[LINE_COLUMN].to_pylist())
        written = write_shard(self.store, unit, fmt, data, footer)
        rec = footer.record(written)
        self.manifest.units[unit] = rec
        self.manifest.save(self.store)
        return rec


def _stream(cfg: JobConfig, job: PreparedJob, todo: list[Unit], committer: Committer, progress: Progress,
            examples: list[str], verbose: bool = False) -> int:
    """Runs the uncommitted units through Ray Data and commits each as it completes; rows generated."""
    from batchlm.pipelines.live import LiveFeed, start_sink

    id_name = id_column_name(cfg)
    generated = 0
    progress.note(f"starting {ray_where()}")
    started_ray = init_ray(cfg, verbose)
    feed = None
    try:
        check_resources(cfg)
        lo, _ = cfg.resources.replica_range()
        progress.note(f"loading the model {cfg.model.name} on {lo} engine replica(s)")
        feed = LiveFeed(start_sink(), progress).start()
        ds = build_dataset(cfg, todo, job.carry, os.environ.get("BATCHLM_UNIT_TRACE"), job.duplicates, feed.sink,
                           verbose)
        buffer = _UnitBuffer({u.index: u.num_rows for u in todo})
        batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
        try:
            for batch in _batches(batches, todo, committer):
                failed = _first_error(batch, id_name) if cfg.output.on_error == "fail" else None
                if failed:
                    raise RowFailed(*failed)
                for unit in buffer.add(batch):
                    table = buffer.pop(unit)
                    rec = committer.commit(unit, table)
                    generated += rec.rows
                    if rec.errors and len(examples) < 5:
                        examples.append("{}: {}".format(*_first_error(table, id_name)))
                    progress.update(rec.rows, rec.errors, rec.input_tokens, rec.output_tokens)
        finally:
            _close_iterator(batches)
    finally:
        if feed is not None:
            feed.stop()
        progress.close()
        if started_ray:
            import ray

            ray.shutdown()
    return generated


def _batches(batches, todo: list[Unit], committer: Committer):
    """The result batches; a stage's failure becomes StageFailed, one line naming the units not committed."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # Ray's and Ray Data's errors carry the stage's exception as their cause
            raise StageFailed([u.index for u in todo if u.index not in committer.manifest.units], e) from e
        yield batch


def _close_iterator(batches, timeout: float = 10.0) -> None:
    """Stops a Ray Data batch iterator and waits for its worker threads.

    NOTE: Ray Data's `iter_threaded` workers are told to stop on close() but not joined; one
    still fetching a block when ray.shutdown() runs touches a shut-down core worker, and Ray then
    exits the whole process with status 1 (seen on SIGTERM and Ctrl-C during a commit).
    """
    close = getattr(batches, "close", None)
    if close is not None:
        close()
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t.name == "iter_threaded" and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))


def run_job(cfg: JobConfig, overwrite: bool = False, stream=None, verbose: bool = False) -> RunResult:
    stream = stream or sys.stderr
    t0 = time.monotonic()
    store = Store(cfg.output.path, cfg.output.storage_options)
    check_location(store, cfg.input.path)
    job = prepare(cfg, stream)
    store.ensure_root()
    lease = Lease(store)
    took_over = lease.acquire()
    try:
        opened = open_output(store, job.expected, overwrite)
        manifest = opened.manifest
        plan = job.plan.units
        todo = [u for u in plan if u.index not in manifest.units]
        manifest.runs.append({"started": time.time(), "units_skipped": len(plan) - len(todo),
                              "units_todo": len(todo)})
        manifest.save(store)
        print(f"batchlm run: {len(plan) - len(todo)} units already committed, {len(todo)} to do; "
              f"output {store.where()}", file=stream, flush=True)
        for note in ([took_over] if took_over else []) + opened.notes:
            print(f"batchlm run: {note}", file=stream)
        progress = Progress(job.plan.total_rows, manifest.rows_done, stream, engines=cfg.resources.replica_range()[0])
        examples: list[str] = []
        committer = Committer(store, manifest, job.expected, cfg.output.compression, lease)
        generated = _stream(cfg, job, todo, committer, progress, examples, verbose) if todo else 0
        return _finish(store, manifest, job, generated, examples, progress, time.monotonic() - t0, stream)
    finally:
        lease.release()


def _finish(store: Store, manifest: Manifest, job: PreparedJob, generated: int, examples: list[str],
            progress: Progress, wall: float, stream) -> RunResult:
    totals = manifest.totals()
    all_failed = totals.rows > 0 and totals.errors == totals.rows
    complete = len(manifest.units) == job.expected.total_units and not all_failed
    manifest.runs[-1].update(finished=time.time(), wall=round(wall, 3), rows_generated=generated)
    manifest.save(store)
    if complete:
        store.write_atomic(SUCCESS, json.dumps({"rows": totals.rows, "errors": totals.errors}).encode())
    result = RunResult(complete, totals.rows, job.plan.total_rows, generated, totals.errors, totals.input_tokens,
                       totals.output_tokens, wall, store.where())
    print(summary(rows=totals.rows, total=job.plan.total_rows, errors=totals.errors, error_examples=examples,
                  in_tok=totals.input_tokens, out_tok=totals.output_tokens, wall=wall,
                  generated_rows=generated, run_in_tok=progress.in_tok, run_out_tok=progress.out_tok,
                  where=store.where(), complete=complete, all_failed=all_failed,
                  speculation=progress.speculation), file=stream)
    return result
