"""`batchlm bench pipeline`: the pipeline's overhead against bare `LLM.generate`.

Contract: `register(bench_subparsers)` adds `pipeline` (the hook
batchlm.bench.cli calls; standard library only at import);
`add_arguments(parser)` declares the options; `bench_pipeline(args) -> exit
code` runs, on the same rows, prompts and engine settings:

1. bare: one `LLM`, the rows read, rendered and tokenized by the job's own
   read stage (`ReadRender`: the same token ids), one `llm.generate` over all
   of them (model load excluded);
2. pipeline: `run_job` into a fresh temporary output (embedded Ray, actor
   pool, shard commits, manifest), timed end to end and in steady state
   (from the engine actor's first call, seen through BATCHLM_UNIT_TRACE, to
   the last commit: Ray start-up and the actor's model load excluded).

A Parquet input with fewer rows than `--rows` is repeated into a temporary
file (each copy's text starts with "[copy k] " and its ids end with "#k").
`--tiny-model` swaps in a fast random model (`build_tiny_model`: the config's
model shrunk to 2 layers of hidden size 64, its own tokenizer), so the figures
measure the pipeline alone, as with an engine at GPU speed.

It prints both rows/s figures and the ratios (issue 9 asks, with
`--tiny-model`, >= 0.85 in steady state and >= 0.70 end to end), plus one JSON
line for scripts. The two runs are sequential so they
never share the CPU.
"""
from __future__ import annotations

import json
import os
import tempfile
import time


def register(bench_sub) -> None:
    p = bench_sub.add_parser("pipeline", help="batchlm run vs bare LLM.generate rows/s on the same rows")
    add_arguments(p)
    p.set_defaults(func=_guarded_bench)
    p = bench_sub.add_parser("resume-check", help="time of a resume's start-up check of a local output")
    p.add_argument("--shards", type=int, default=1000, help="committed shards in the output")
    p.add_argument("--rows-per-shard", type=int, default=100)
    p.add_argument("--repeat", type=int, default=3, help="runs of the check; the median is reported")
    p.set_defaults(func=bench_resume_check)


def bench_resume_check(args) -> int:
    """Writes a local output of --shards committed shards, then times open_output on it (a resume's
    start-up: listing, lease-free checks of every shard's size and footer, manifest save)."""
    import statistics

    import pyarrow as pa

    from batchlm.pipelines.manifest import ShardFooter, encode_shard, shard_name
    from batchlm.pipelines.output import Expected, open_output
    from batchlm.pipelines.storage import Store

    n, rows = args.shards, args.rows_per_shard
    expected = Expected({"bench": True}, "plan", n, n * rows, {"in.parquet": {"size": 1}}, ("in.parquet",) * n)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "out"))
        store.ensure_root()
        manifest = open_output(store, expected).manifest
        for u in range(n):
            table = pa.table({"id": [f"{u}-{i}" for i in range(rows)], "generated_text": ["x" * 200] * rows,
                              "error": pa.array([None] * rows, pa.string())})
            footer = ShardFooter(rows=rows, config_hash=expected.config_hash, plan=expected.plan,
                                 source=expected.source(u))
            written = store.write_atomic(shard_name(u), encode_shard(table, footer, "zstd"))
            manifest.units[u] = footer.record(written)
        manifest.save(store)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            opened = open_output(store, expected)
            times.append(time.perf_counter() - t0)
            assert len(opened.manifest.units) == n and not opened.notes, opened.notes
    med = statistics.median(times)
    print(f"resume start-up check of {n} local shards: median {med:.2f} s over {args.repeat} runs "
          f"({', '.join(f'{t:.2f}' for t in times)})")
    print(json.dumps({"shards": n, "median_s": round(med, 3), "runs_s": [round(t, 3) for t in times]}))
    return 0


# NOTE: --tiny-model runs the engine on one thread (bare and pipeline alike) unless --set says otherwise.
# An engine on a GPU needs about one core to drive it and leaves the rest to reading, rendering,
# tokenizing and writing; a CPU engine given every core (quickstart: cpus_per_replica 2 on this 2-core
# machine) leaves them none, and its bare run is then the only one that has the whole machine. Measured
# 2026-11-26 (2-core Xeon, 8000 rows): 2 engine threads steady 65% / end to end 46% of bare (160 vs 247
# rows/s); 1 thread 94% / 66% (140 vs 149 rows/s). Rendering and tokenizing cost ~1.25 ms of CPU per row.

def _guarded_bench(args) -> int:
    from batchlm.pipelines.cli import _guarded

    return _guarded(bench_pipeline, args)


def add_arguments(p) -> None:
    p.add_argument("--config", default="configs/quickstart.yaml", help="job config giving data, prompt, model")
    p.add_argument("--rows", type=int, default=200, help="rows to run (input.limit)")
    p.add_argument("--max-tokens", type=int, default=32, help="sampling.max_tokens (ignore_eos: fixed work)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tiny-model", action="store_true",
                   help="a fast random engine (2 layers, hidden 64, the config's model's tokenizer, "
                        "1 thread unless --set resources.cpus_per_replica=N): "
                        "measures the pipeline alone, as if the engine were on a GPU")


def _bare(cfg, rows: int) -> tuple[float, int, dict]:
    import pyarrow as pa

    from batchlm import LLM
    from batchlm.pipelines.runner import engine_threads, id_column_name
    from batchlm.pipelines.sources import plan_units
    from batchlm.pipelines.stages import ReadRender, StepClock

    # the rows read, rendered and tokenized by the job's own read stage: the same token ids
    units = plan_units(cfg.input, cfg.output.rows_per_shard)
    table = ReadRender(cfg, id_column_name(cfg), [])(pa.Table.from_pylist([u.to_dict() for u in units]))
    prompts = [ids for ids in table["__ids"].to_pylist() if ids is not None][:rows]
    if engine_threads(cfg):  # the same threads the engine actor gets
        import torch

        torch.set_num_threads(engine_threads(cfg))
    llm = LLM(**cfg.model.engine_kwargs())
    clock, engine = StepClock(), llm.engine
    step = engine.step
    engine.step = lambda: clock.step(step)  # the actor's StepClock, around the same call
    t0 = time.monotonic()
    outs = llm.generate(prompts, cfg.sampling.params(), use_tqdm=False)
    dt = time.monotonic() - t0
    del engine.step
    return dt, sum(len(o.outputs[0].token_ids) for o in outs), clock.as_dict()


def _engine_time(calls: list[dict]) -> dict:
    """Per engine process, StepClock totals between its first and last call (the trace's lines carry
    them cumulatively, so the last call's own steps are not in them): steps, time stepping, CPU."""
    out = {"steps": 0, "step_wall_s": 0.0, "step_cpu_s": 0.0, "window_s": 0.0}
    for pid in {c["pid"] for c in calls}:
        mine = sorted((c for c in calls if c["pid"] == pid), key=lambda c: c["t"])
        first, last = mine[0], mine[-1]
        for k in ("steps", "step_wall_s", "step_cpu_s"):
            out[k] += last.get(k, 0) - first.get(k, 0)
        out["window_s"] += last["t"] - first["t"]
    return out


def _enough_rows(cfg, rows: int, tmp: str) -> str:
    """The config's Parquet input, repeated into a local file of at least `rows` rows when it has
    fewer: copy k's text starts with "[copy k] " (so its prompts are new ones, not prefix-cache hits)
    and its id column gets "#k"."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from batchlm.pipelines.sources import plan_units, read_unit

    units = plan_units(cfg.input, cfg.output.rows_per_shard)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if not k.startswith("__")}
                                  for u in units for r in read_unit(cfg.input, u)])
    if table.num_rows >= rows:
        return cfg.input.path
    copies = []
    for k in range(-(-rows // table.num_rows)):
        t = table
        if "text" in t.column_names:
            t = t.set_column(t.schema.get_field_index("text"), "text",
                             pc.binary_join_element_wise(f"[copy {k}] ", t["text"], ""))
        if cfg.input.id_column:
            i = t.schema.get_field_index(cfg.input.id_column)
            t = t.set_column(i, cfg.input.id_column,
                             pc.binary_join_element_wise(pc.cast(t[cfg.input.id_column], pa.string()), f"#{k}", ""))
        copies.append(t)
    path = os.path.join(tmp, "bench-input.parquet")
    pq.write_table(pa.concat_tables(copies).slice(0, rows), path)
    return path


def _ms(seconds: float, steps: int) -> float | None:
    return round(1000 * seconds / steps, 3) if steps else None


def build_tiny_model(out_dir: str, base: str) -> str:
    """A fast random engine for measuring the pipeline alone: `base`'s config shrunk to 2 layers of
    hidden size 64 (4 heads of 16, 2 KV heads), random weights (seed 0), `base`'s own tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    from batchlm.models.loader import load_config, load_tokenizer
    from batchlm.models.resolve import resolve_model

    src, _ = resolve_model(base, weights=False)  # config and tokenizer only
    config = load_config(src)
    config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(src).save_pretrained(out_dir)
    return out_dir


def bench_pipeline(args) -> int:
    import io

    from batchlm.pipelines.config import load_config
    from batchlm.pipelines.runner import engine_threads, run_job

    with tempfile.TemporaryDirectory() as tmp:
        overrides = [*args.overrides, f"input.limit={args.rows}", f"sampling.max_tokens={args.max_tokens}",
                     "sampling.ignore_eos=true", f"output.path={tmp}/out"]
        cfg = load_config(args.config, overrides)
        if cfg.input.format == "parquet":
            overrides.append(f"input.path={_enough_rows(cfg, args.rows, tmp)}")
        if args.tiny_model:
            # float32: bfloat16 (dtype auto on CPUs with native bf16) is ~50x slower at these tiny shapes
            overrides += [f"model.name={build_tiny_model(os.path.join(tmp, 'tiny-model'), cfg.model.name)}",
                          "model.dtype=float32"]
            if not any(o.startswith("resources.cpus_per_replica=") for o in args.overrides):
                # as on a GPU, one core drives the engine and the others feed it (NOTE above)
                overrides.append("resources.cpus_per_replica=1")
        cfg = load_config(args.config, overrides)
        bare_s, bare_tokens, bare_clock = _bare(cfg, args.rows)
        trace = os.path.join(tmp, "trace.jsonl")
        os.environ["BATCHLM_UNIT_TRACE"] = trace
        t0 = time.time()
        result = run_job(cfg, stream=io.StringIO())
        end = time.time()
        calls = [json.loads(line) for line in open(trace)]
        first_call = min(c["t"] for c in calls)
        idle = sum(c.get("idle", 0.0) for c in calls)  # the engine empty between calls
        engine = _engine_time(calls)
    steady = end - first_call
    n = result.generated_rows
    fig = {
        "rows": n, "max_tokens": args.max_tokens, "engine_threads": engine_threads(cfg),
        "model": "tiny random (2 layers, hidden 64)" if args.tiny_model
        else cfg.model.name,
        "bare_generate_s": round(bare_s, 2), "bare_rows_per_s": round(n / bare_s, 3),
        "pipeline_wall_s": round(end - t0, 2), "pipeline_rows_per_s": round(n / (end - t0), 3),
        "pipeline_steady_s": round(steady, 2), "pipeline_steady_rows_per_s": round(n / steady, 3),
        "steady_ratio": round(bare_s / steady, 3), "end_to_end_ratio": round(bare_s / (end - t0), 3),
        "output_tokens": result.output_tokens, "bare_output_tokens": bare_tokens,
        "engine_idle_s": round(idle, 2),
        "bare_steps": bare_clock["steps"], "bare_step_ms": _ms(bare_clock["step_wall_s"], bare_clock["steps"]),
        "bare_step_cpu_ms": _ms(bare_clock["step_cpu_s"], bare_clock["steps"]),
        "pipeline_steps": engine["steps"], "pipeline_step_ms": _ms(engine["step_wall_s"], engine["steps"]),
        "pipeline_step_cpu_ms": _ms(engine["step_cpu_s"], engine["steps"]),
        "pipeline_engine_busy": round(engine["step_wall_s"] / engine["window_s"], 3) if engine["window_s"] else None,
    }
    print(f"engine: {fig['model']}, {fig['engine_threads'] or 'default'} torch threads (bare and pipeline)")
    print(f"bare LLM.generate      {n} rows in {bare_s:7.2f} s  {fig['bare_rows_per_s']:.3f} rows/s")
    print(f"batchlm run (steady)   {n} rows in {steady:7.2f} s  {fig['pipeline_steady_rows_per_s']:.3f} rows/s"
          f"  = {fig['steady_ratio']:.0%} of bare")
    print(f"batchlm run (end2end)  {n} rows in {end - t0:7.2f} s  {fig['pipeline_rows_per_s']:.3f} rows/s"
          f"  = {fig['end_to_end_ratio']:.0%} of bare (includes Ray start and the actor's model load)")
    print(f"engine idle between batches: {idle:.2f} s of the steady {steady:.2f} s")
    print(f"engine steps: bare {fig['bare_steps']} x {fig['bare_step_ms']} ms ({fig['bare_step_cpu_ms']} ms CPU); "
          f"pipeline {fig['pipeline_steps']} x {fig['pipeline_step_ms']} ms ({fig['pipeline_step_cpu_ms']} ms CPU), "
          f"stepping {fig['pipeline_engine_busy']:.0%} of the time between its first and last call"
          if fig["pipeline_engine_busy"] is not None else "engine steps: one engine call only, no figure")
    print(json.dumps(fig))
    return 0
