"""`bench throughput`: batchlm's offline throughput, optionally against transformers.

Contract: `run(args)` builds one workload (token ids, see workload.py), times
`LLM.generate` on it (model load and a tiny warm-up excluded; median over
`--repeats`), then with `--baseline hf` times transformers `generate` on the
same token ids and the same weights (`LLM.model_dir`) for each of
`--hf-batch-sizes`, keeps the best, prints the ratio of output tokens/s and
how many outputs are token-identical. With `--json-schema` the same engine
is timed again with every output constrained to the schema (structured.py).
It also measures the machine's matmul
rate and prints the roofline fraction each engine reached (roofline.py).
Returns a process exit code; with `--json` the results are written there too.
"""
from __future__ import annotations

import statistics
import time

from batchlm.bench.report import Row, command_line, format_table, write_json
from batchlm.bench.roofline import matmul_gflops, workload_flops


def _median_run(fn, repeats: int):
    """fn() -> (wall_s, result); returns the run with the median wall time."""
    runs = sorted((fn() for _ in range(max(1, repeats))), key=lambda r: r[0])
    return runs[len(runs) // 2]


def build_workload(args, tokenizer):
    from batchlm.bench import workload as wl

    if args.dataset:
        return wl.dataset_workload(tokenizer, args.dataset, args.text_column, args.chat,
                                   args.num_prompts, args.max_tokens, args.output_len)
    n = args.num_prompts or 128
    if args.input_len is not None:
        return wl.fixed_length_workload(tokenizer, n, args.input_len, args.output_len,
                                        args.max_tokens, args.seed)
    lo, hi = args.prompt_len_range
    work = wl.summarization_workload(tokenizer, n, lo, hi, args.max_tokens, args.seed, args.task)
    if args.output_len is not None:
        return wl.Workload(work.prompts, args.output_len, True,
                           work.description.split(", up to")[0] + f", exactly {args.output_len} new tokens")
    return work


def _time_batchlm(llm, work, repeats: int):
    from batchlm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens, ignore_eos=work.ignore_eos)
    # Warm-up on a prompt unrelated to the workload (no prefix-cache head start).
    llm.generate([[t % 1000 + 100 for t in range(24)]], SamplingParams(temperature=0.0, max_tokens=4),
                 use_tqdm=False)

    def once():
        # NOTE: without a reset, repeats 2.. would find every prompt in the prefix cache.
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(work.prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, outs

    return _median_run(once, repeats)


def _strip_eos(ids: list[int], eos: set[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in eos else list(ids)


def compare_outputs(a: list[list[int]], b: list[list[int]], eos: set[int]) -> tuple[int, list[str]]:
    """How many pairs are token-identical (a trailing eos ignored), and where the others differ."""
    same, where = 0, []
    for i, (x, y) in enumerate(zip(a, b)):
        x, y = _strip_eos(x, eos), _strip_eos(y, eos)
        if x == y:
            same += 1
        else:
            pos = next((k for k, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
            where.append(f"#{i}@{pos}")
    return same, where


def _hf_rows(args, model_dir, work, flops_of, gflops, batchlm_tokens, dtype: str, device: str):
    from batchlm.bench.hf_baseline import eos_token_ids, load_hf_model, run_hf

    model = load_hf_model(model_dir, dtype, device)  # the dtype and device batchlm computed on
    rows, runs = [], []
    for bs in args.hf_batch_sizes:
        limit = None
        if args.hf_max_prompts and args.hf_max_prompts < len(work.prompts):
            limit = max(bs, -(-args.hf_max_prompts // bs) * bs)  # whole batches only
            limit = min(limit, len(work.prompts))
        print(f"[bench] transformers generate, batch size {bs}"
              + (f", first {limit} prompts" if limit else "") + " ...", flush=True)

        def once():
            r = run_hf(model, work.prompts, work.max_tokens, bs, work.ignore_eos, limit)
            return r.wall_s, r

        _, r = _median_run(once, args.repeats)
        runs.append(r)
        print(f"[bench]   {r.num_output_tokens} output tokens in {r.wall_s:.1f} s: "
              f"{r.output_tokens_per_s:.2f} tok/s", flush=True)
        note = "" if r.num_prompts == len(work.prompts) else \
            f"EXTRAPOLATED: rates from the first {r.num_prompts}/{len(work.prompts)} prompts"
        rows.append(Row(f"hf generate bs={bs}", r.num_prompts, r.num_prompt_tokens, r.num_output_tokens,
                        r.wall_s, note, flops_of(r.num_prompt_tokens, r.num_output_tokens) / r.wall_s / 1e9 / gflops))
    best = max(range(len(runs)), key=lambda k: runs[k].output_tokens_per_s)
    result = {"best_batch_size": runs[best].batch_size}
    full = [k for k, r in enumerate(runs) if r.num_prompts == len(work.prompts)]
    if batchlm_tokens is not None:
        ref = runs[best] if best in full or not full else runs[max(full, key=lambda k: runs[k].output_tokens_per_s)]
        n = ref.num_prompts
        same, where = compare_outputs(batchlm_tokens[:n], ref.token_ids, set(eos_token_ids(model)))
        result.update(identical=same, compared=n, compared_batch_size=ref.batch_size, differ_at=where)
    return rows, rows[best], result


def _llamacpp_row(args, work, flops_of, gflops, batchlm_tokens, eos: set[int]):
    import torch

    from batchlm.bench.llamacpp_baseline import available, run_llamacpp
    from batchlm.models.resolve import gguf_source

    if not available():
        raise SystemExit("bench throughput: --baseline llamacpp needs llama-cpp-python "
                         "(pip install llama-cpp-python; it builds llama.cpp from source)")
    gguf = gguf_source(args.model)
    if gguf is None:
        raise SystemExit(f"bench throughput: --baseline llamacpp needs a GGUF model; {args.model!r} is not one")
    threads = torch.get_num_threads()
    print(f"[bench] llama.cpp on {gguf.name}, {threads} threads, one prompt at a time ...", flush=True)
    r = run_llamacpp(str(gguf), work.prompts, work.max_tokens, work.ignore_eos, threads)
    print(f"[bench]   {r.num_output_tokens} output tokens in {r.wall_s:.1f} s: "
          f"{r.output_tokens_per_s:.2f} tok/s (decode {r.decode_tokens_per_s:.1f} tok/s)", flush=True)
    row = Row("llama.cpp batch 1", len(r.token_ids), r.num_prompt_tokens, r.num_output_tokens, r.wall_s,
              f"{gguf.name} as stored, llama-cpp-python {r.version}",
              flops_of(r.num_prompt_tokens, r.num_output_tokens) / r.wall_s / 1e9 / gflops)
    result = {"version": r.version, "gguf": gguf.name, "threads": threads,
              "decode_tokens_per_s": r.decode_tokens_per_s, "prompt_s": r.prompt_s, "decode_s": r.decode_s}
    if batchlm_tokens is not None:
        same, where = compare_outputs(batchlm_tokens, r.token_ids, eos)
        result.update(identical=same, compared=len(r.token_ids), differ_at=where)
    return row, result


def _torch_dtype(name: str):
    import torch

    if name == "auto":
        from batchlm.engine.device import auto_dtype

        return auto_dtype(torch.device("cpu"))
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def _default_device() -> str:
    """Where the engine would run: the baseline alone (--skip-batchlm) runs there too."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def spec_kwargs(spec: str, dtype: str = "auto") -> dict:
    """`--compare` item -> LLM kwargs, in bench quality's config syntax (a dtype
    name, or a quantization method run in `dtype`, optionally `+kv_<dtype>`)."""
    from batchlm.bench.quality import parse_config

    try:
        return parse_config(spec, dtype)
    except ValueError as e:
        raise SystemExit(f"bench throughput: --compare: {e}") from None


def _engine(args, kwargs: dict):
    from batchlm import LLM

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return LLM(model=args.model, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=not args.no_prefix_caching,
               kv_cache_memory=args.kv_cache_memory, seed=args.seed, compile_model=args.compile,
               attention_backend=args.attention_backend, enforce_eager=args.enforce_eager, **kwargs)


def _describe(llm) -> str:
    q = llm.engine.loaded.quantization
    kv = llm.engine.runner.kv_caches[0][0].dtype
    return (f"{str(llm.engine.dtype).removeprefix('torch.')}"
            + (f", {q.name} weights" if q else "") + f", kv {str(kv).removeprefix('torch.')}")


def _batchlm_row(llm, name, work, repeats, flops_of, gflops):
    print(f"[bench] {name} ({_describe(llm)}) generate on {len(work.prompts)} prompts ...", flush=True)
    wall, outs = _time_batchlm(llm, work, repeats)
    errors = [o.error for o in outs if getattr(o, "error", None)]
    tokens = [list(o.outputs[0].token_ids) if o.outputs else [] for o in outs]
    n_out = sum(len(t) for t in tokens)
    print(f"[bench]   {n_out} output tokens in {wall:.1f} s: {n_out / wall:.2f} tok/s", flush=True)
    note = f"{len(errors)} requests failed: {errors[0]}" if errors else _describe(llm)
    return Row(name, len(outs), work.num_prompt_tokens, n_out, wall, note,
               flops_of(work.num_prompt_tokens, n_out) / wall / 1e9 / gflops), tokens


def _step_phases(llm, work) -> str:
    """One more run of the workload with each phase of the engine's step timed (step_phases.py)."""
    from batchlm.bench.step_phases import StepPhases

    phases = StepPhases(llm.engine)
    try:
        wall, outs = _time_batchlm(llm, work, 1)
    finally:
        phases.remove()
    n = sum(len(o.outputs[0].token_ids) for o in outs if o.outputs)
    return (f"one more run with each phase of the step timed: {wall:.2f} s, {n} output tokens\n"
            + phases.report())


def _speculative_row(args, work, flops_of, gflops, rows, batchlm_tokens) -> dict:
    """Time batchlm with args.speculative_config (after the plain run, same
    workload); append its row and return the ratio, agreement and acceptance."""
    import json

    other = _engine(args, {"dtype": args.dtype, "quantization": args.quantization,
                           "kv_cache_dtype": args.kv_cache_dtype or "auto",
                           "speculative_config": args.speculative_config})
    row, tokens = _batchlm_row(other, "batchlm speculative", work, args.repeats, flops_of, gflops)
    rows.append(row)
    eos = set(other.engine.eos_token_ids)
    same, where = compare_outputs(tokens, batchlm_tokens, eos)
    out = {"config": json.dumps(args.speculative_config, sort_keys=True),
           "ratio_output_tokens_per_s": row.output_tokens_per_s / rows[0].output_tokens_per_s,
           "identical": same, "compared": len(tokens), "differ_at": where,
           **other.engine.spec_stats.as_dict()}
    del other
    return out


def run(args) -> int:
    import torch
    from transformers import AutoConfig, AutoTokenizer

    llm = None
    if args.skip_batchlm and args.baseline == "llamacpp":
        from batchlm.models.resolve import resolve_model

        model_dir = str(resolve_model(args.model, weights=False)[0])  # config + tokenizer of the GGUF
    elif args.skip_batchlm:
        model_dir = args.model
    else:
        llm = _engine(args, {"dtype": args.dtype, "quantization": args.quantization,
                             "kv_cache_dtype": args.kv_cache_dtype or "auto"})
        model_dir = str(llm.model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    work = build_workload(args, tokenizer)
    lens = [len(p) for p in work.prompts]
    run_dtype = llm.engine.dtype if llm is not None else _torch_dtype(args.dtype)
    run_device = str(llm.engine.device) if llm is not None else _default_device()
    gflops = matmul_gflops(dtype=run_dtype)
    flops_of = lambda p, o: workload_flops(config, p, o)  # noqa: E731

    rows, summary = [], {}
    batchlm_tokens = None
    ran_batchlm = llm is not None
    if ran_batchlm:
        row, batchlm_tokens = _batchlm_row(llm, "batchlm", work, args.repeats, flops_of, gflops)
        rows.append(row)
        if args.step_phases:
            summary["step_phases"] = _step_phases(llm, work)
        if args.json_schema is not None:  # same engine, same prompts
            from batchlm.bench.structured import structured_row

            row, summary["json_schema"] = structured_row(llm, args.json_schema_value, work, args.repeats,
                                                         flops_of, gflops)
            rows.append(row)
        llm = None  # free its weights and KV cache before the next engine
        for spec in args.compare or []:
            other = _engine(args, spec_kwargs(spec))  # quantized configs: dtype auto
            g = matmul_gflops(dtype=other.engine.dtype)
            row, _ = _batchlm_row(other, f"batchlm {spec}", work, args.repeats, flops_of, g)
            rows.append(row)
            summary.setdefault("compare", {})[spec] = rows[0].output_tokens_per_s / row.output_tokens_per_s
            del other
        if args.speculative_config is not None:
            summary["speculative"] = _speculative_row(args, work, flops_of, gflops, rows, batchlm_tokens)
    if args.baseline == "llamacpp":
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        row, summary["llamacpp"] = _llamacpp_row(args, work, flops_of, gflops, batchlm_tokens, eos)
        rows.append(row)
        if ran_batchlm:
            summary["ratio_llamacpp_output_tokens_per_s"] = rows[0].output_tokens_per_s / row.output_tokens_per_s
    if args.baseline == "hf":
        hf_rows, best, hf_summary = _hf_rows(args, model_dir, work, flops_of, gflops, batchlm_tokens,
                                            str(run_dtype).removeprefix("torch."), run_device)
        rows.extend(hf_rows)
        summary["hf"] = hf_summary
        if ran_batchlm:
            summary["ratio_output_tokens_per_s"] = rows[0].output_tokens_per_s / best.output_tokens_per_s

    print()
    print(f"command:  {command_line(args.argv)}")
    print(f"model:    {args.model} ({model_dir}), dtype {args.dtype}"
          + (", layers torch.compile'd (compile time not in the figures)" if args.compile else ""))
    print(f"workload: {work.description}; {work.num_prompt_tokens} prompt tokens "
          f"(min {min(lens)}, median {statistics.median(lens):.0f}, max {max(lens)})")
    print(f"machine:  torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{str(run_dtype).removeprefix('torch.')} matmul 2048^3: {gflops:.1f} GFLOP/s "
          "(roofline = fraction of the matmul rate in the dtype each engine computes in)")
    print(f"repeats:  {args.repeats} (median wall time)\n")
    print(format_table(rows))
    if "step_phases" in summary:
        print("\n" + summary["step_phases"])
    sp = summary.get("speculative")
    if sp:
        print(f"\nbatchlm speculative / batchlm output tokens/s (same process, same workload): "
              f"{sp['ratio_output_tokens_per_s']:.2f}x; token-identical outputs: {sp['identical']}/{sp['compared']}"
              + (f" (differ at request@token: {' '.join(sp['differ_at'][:20])})" if sp["differ_at"] else ""))
        print(f"speculation: {sp['proposed']} tokens proposed, {sp['accepted']} accepted "
              f"({sp['acceptance_rate']:.1%}), mean acceptance length {sp['mean_acceptance_length']:.2f} "
              f"tokens per verification")
    js = summary.get("json_schema")
    if js:
        print(f"\nbatchlm json-schema / batchlm output tokens/s (same engine, same prompts, median of "
              f"back-to-back pairs {js['pair_ratios']}): {js['ratio_output_tokens_per_s']:.2f}x; outputs valid: {js['valid']}/{js['outputs']} "
              f"({js['validated_with']}), cut by max_tokens: {js['cut_by_max_tokens']}")
        print(f"batchlm json-schema / batchlm with the same output lengths (ignore_eos; the grammar's own "
              f"cost; pairs {js['same_lengths_ratios']}): {js['ratio_same_lengths']:.2f}x")
    for spec, ratio in summary.get("compare", {}).items():
        print(f"\nbatchlm / batchlm {spec} output tokens/s (same process, same workload): {ratio:.2f}x")
    if "ratio_output_tokens_per_s" in summary:
        print(f"\nbatchlm / best transformers ({best.name}) output tokens/s: "
              f"{summary['ratio_output_tokens_per_s']:.2f}x")
    lc = summary.get("llamacpp")
    if lc:
        print(f"\nllama.cpp {lc['version']} batch-1 decode: {lc['decode_tokens_per_s']:.1f} tok/s "
              f"({lc['threads']} threads, {lc['gguf']})")
        if "ratio_llamacpp_output_tokens_per_s" in summary:
            print(f"batchlm / llama.cpp output tokens/s (same prompts): "
                  f"{summary['ratio_llamacpp_output_tokens_per_s']:.2f}x")
        if "identical" in lc:
            print(f"token-identical outputs, batchlm vs llama.cpp: {lc['identical']}/{lc['compared']}")
    hf = summary.get("hf", {})
    if "identical" in hf:
        print(f"token-identical outputs, batchlm vs hf bs={hf['compared_batch_size']}: "
              f"{hf['identical']}/{hf['compared']}"
              + (f" (differ at request@token: {' '.join(hf['differ_at'][:20])})" if hf["differ_at"] else ""))
    if args.json:
        write_json(args.json, {
            "command": command_line(args.argv), "model": args.model, "model_dir": model_dir,
            "dtype": args.dtype, "run_dtype": str(run_dtype).removeprefix("torch."),
            "quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
            "compile_model": args.compile, "workload": work.description,
            "num_prompts": len(work.prompts),
            "prompt_tokens": work.num_prompt_tokens, "matmul_gflops": gflops, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "rows": [r.to_dict() for r in rows], **summary})
        print(f"\nwrote {args.json}")
    return 0
