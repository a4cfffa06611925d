"""`python -m batchlm bench throughput|classify|quality|kernels|...`: the benchmark commands.

Contract: `register(subparsers)` adds `bench` with its own subcommands, each
with `set_defaults(func=handler)`; a handler takes the parsed args and returns
an exit code. This module imports only the standard library; torch,
transformers and the engine are imported inside the handlers.

Extension hook: any module named in `EXTRA_BENCH_MODULES` that can be imported
(e.g. `batchlm.pipelines.bench`, once it exists) is given the bench
subparsers through its own `register(bench_subparsers)`; it must likewise
import only the standard library at import time.
"""
from __future__ import annotations

import argparse
import importlib
import json

EXTRA_BENCH_MODULES = ("batchlm.pipelines.bench",)
DEFAULT_MODEL = "smollm2-135m-instruct"
QUALITY_CONFIGS = "float32,bfloat16,int8,int4,int4_g32,int4_g128"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="short name, HF dir or GGUF file")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on CPUs with native bf16 (AVX-512 BF16/AMX), else float32")
    p.add_argument("--quantization", default=None, metavar="METHOD",
                   help="int8, int8_dynamic, int4, int4_g32, int4_g64, int4_g128 (fp8: CUDA)")
    p.add_argument("--kv-cache-dtype", default=None, choices=["auto", "float32", "bfloat16", "float16", "fp8"])
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="KV cache budget in bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model's layers (LLM(compile_model=True))")
    # NOTE: kernels.dispatch.ATTENTION_BACKENDS (not imported here: torch); a test keeps them equal.
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton", "native"],
                   help="kernels: triton = Triton attention + layer kernels (CUDA; CPU: interpreter); native = "
                        "batchlm's C kernels (CPU); torch = the PyTorch references; auto: triton on CUDA, native "
                        "on the CPU")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (CUDA)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON here")
    p.set_defaults(argv=None)


def _add_throughput(sub) -> None:
    p = sub.add_parser("throughput", help="offline generation throughput (optionally vs transformers)",
                       description="Time LLM.generate on a workload; with --baseline hf also "
                                   "transformers generate on the same prompts and weights.")
    _engine_args(p)
    data = p.add_argument_group("workload (default: chat summarization prompts of 100-600 tokens)")
    data.add_argument("--dataset", metavar="PATH", help="a Parquet or JSONL file")
    data.add_argument("--text-column", default="text")
    data.add_argument("--chat", nargs="?", const="summarize", choices=["summarize", "raw"],
                      help="wrap each dataset text in the chat template, inside the "
                           "summarization instruction (default) or as is (raw)")
    data.add_argument("--task", choices=["summarize", "rewrite"], default="summarize",
                      help="the default workload's instruction: summarize the passage, or rewrite it "
                           "keeping its wording (input-grounded: where n-gram speculation pays)")
    data.add_argument("--input-len", type=int, help="synthetic raw prompts of this many tokens")
    data.add_argument("--output-len", type=int, help="exactly this many new tokens (ignore eos)")
    data.add_argument("--prompt-len-range", type=int, nargs=2, default=[100, 600], metavar=("MIN", "MAX"))
    data.add_argument("--num-prompts", type=int, default=None, help="default 128 (dataset: all rows)")
    data.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (eos stops earlier)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per engine; the median is reported")
    p.add_argument("--compare", action="append", metavar="CONFIG",
                   help="also time batchlm with this config in the same process on the same "
                        "prompts, and print the ratio: a dtype (float32), a quantization "
                        "(int8, int4_g32; run with dtype auto), optionally +kv_<dtype>; repeatable")
    p.add_argument("--speculative-config", type=_json_object, metavar="JSON",
                   help="also time batchlm with this speculative_config in the same process on the same "
                        "prompts (e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4}'), and print "
                        "the ratio, token-identical outputs, proposed/accepted and mean acceptance length")
    p.add_argument("--json-schema", metavar="FILE",
                   help="also time batchlm on the same engine and prompts with every output constrained to "
                        "this JSON schema (greedy), and print the output tokens/s ratio to the unconstrained "
                        "run and how many outputs validate")
    p.add_argument("--baseline", choices=["hf", "llamacpp"],
                   help="also run transformers generate (hf), or llama.cpp on the same GGUF file one "
                        "prompt at a time (llamacpp; needs llama-cpp-python, not a dependency)")
    p.add_argument("--hf-batch-sizes", type=_int_list, default=[1, 8, 16, 32], metavar="1,8,16,32")
    p.add_argument("--hf-max-prompts", type=int, default=None, metavar="N",
                   help="time transformers on the first N prompts only (whole batches); "
                        "its rates are then marked EXTRAPOLATED")
    p.add_argument("--step-phases", action="store_true",
                   help="after the timed runs, one more with each phase of the engine's step timed "
                        "(schedule, model run, logits, bookkeeping, sampling): where a step's time goes")
    p.add_argument("--skip-batchlm", action="store_true",
                   help="time only the baseline (--model must then be an HF-format dir)")
    p.set_defaults(func=_run_throughput)


def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="label scoring with a shared instruction, prefix caching on vs off",
                       description="Score labels for short texts behind a shared ~300-token "
                                   "instruction, with prefix caching on and off.")
    _engine_args(p)
    p.add_argument("--num-rows", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the median is reported")
    p.add_argument("--only", choices=["on", "off"], help="run just one setting")
    p.set_defaults(func=_run_classify)


def _add_quality(sub) -> None:
    p = sub.add_parser("quality", help="perplexity and greedy agreement of precision configs vs float32",
                       description="For each config (float32 first, the reference): perplexity on a "
                                   "committed public-domain text (batchlm/bench/data/SOURCE.md), greedy "
                                   "outputs token-identical to float32's, weight bytes. A config the "
                                   "engine rejects is reported as not available.")
    _engine_args(p)
    # NOTE: the config list decides each config's dtype, quantization and KV cache dtype;
    # --dtype is only for the quantized ones (--quantization and --kv-cache-dtype are refused).
    p.set_defaults(dtype="auto")
    p.add_argument("--configs", default=QUALITY_CONFIGS,
                   metavar="C1,C2,...",
                   help="dtype names (float32, bfloat16, float16, auto) or quantization names "
                        "(run with --dtype), each optionally +kv_<dtype> for the KV cache, and a "
                        "quantization +dense_head (LM head unquantized) or +dense_layerN (layer N); "
                        "float32 always runs first")
    p.add_argument("--window", type=int, default=1024, help="tokens per scoring window")
    p.add_argument("--stride", type=int, default=512,
                   help="a window starts every STRIDE (< WINDOW) tokens; each token is scored once, "
                        "after the first window with >= WINDOW - STRIDE tokens of context")
    p.add_argument("--text-tokens", type=int, default=0, metavar="N",
                   help="score only the first N tokens of the text (default 0: all of it)")
    p.add_argument("--num-prompts", type=int, default=16, help="greedy agreement prompts")
    p.add_argument("--max-tokens", type=int, default=64, help="greedy new tokens per prompt (eos stops)")
    p.add_argument("--prompt-len-range", type=int, nargs=2, default=[100, 600], metavar=("MIN", "MAX"))
    p.set_defaults(func=_run_quality)


def _add_kernels(sub) -> None:
    p = sub.add_parser("kernels", help="each kernel's time, GB/s and TFLOP/s vs this device's copy/matmul ceilings",
                       description="Time the paged attention (decode, prefill), the KV-cache write and the layer "
                                   "kernels (residual add + RMSNorm, rotary, SiLU-and-mul): Triton and the PyTorch "
                                   "references on CUDA, the references only on the CPU. Sizes default per device "
                                   "(CUDA: decode 256 seqs x 1024 context).")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    shapes = p.add_argument_group("shapes (default: the default model's, SmolLM2-135M)")
    for name, default in (("heads", 9), ("kv-heads", 3), ("head-dim", 64), ("hidden", 576),
                          ("intermediate", 1536), ("block-size", 16)):
        shapes.add_argument(f"--{name}", type=_positive, default=default)
    sizes = p.add_argument_group("sizes (default per device: batchlm/bench/kernels.py SIZES)")
    for name in ("decode-seqs", "decode-context", "prefill-seqs", "prefill-len", "tokens", "copy-mib",
                 "matmul-n"):
        sizes.add_argument(f"--{name}", type=_positive, default=None)
    p.add_argument("--warmup", type=_positive, default=3)
    p.add_argument("--repeats", type=_positive, default=20)
    p.add_argument("--decode-sweep", action="store_true",
                   help="CUDA: also time the Triton decode kernels alone under each tiling of DECODE_SWEEP "
                        "(batchlm/kernels/triton_attention.py), each checked against the reference first")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON here")
    p.set_defaults(func=_run_kernels)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _run_kernels(args) -> int:
    from batchlm.bench.kernels import run

    return run(args)


def _run_throughput(args) -> int:
    from batchlm.bench.throughput import run

    if args.skip_batchlm and args.baseline is None:
        raise SystemExit("bench throughput: --skip-batchlm needs --baseline hf or llamacpp")
    if args.json_schema is not None:
        if args.skip_batchlm:
            raise SystemExit("bench throughput: --json-schema needs batchlm's run (drop --skip-batchlm)")
        from batchlm.bench.structured import load_schema

        args.json_schema_value = load_schema(args.json_schema)
    if args.speculative_config is not None:
        from batchlm.speculative import parse_speculative_config

        try:
            parse_speculative_config(args.speculative_config)
        except ValueError as e:
            raise SystemExit(f"bench throughput: --speculative-config: {e}") from None
    return run(args)


def _run_classify(args) -> int:
    from batchlm.bench.classify import run

    return run(args)


def _run_quality(args) -> int:
    from batchlm.bench.quality import run

    if args.quantization is not None or args.kv_cache_dtype is not None:
        raise SystemExit("bench quality: name quantization and KV cache dtype per config in --configs "
                         "(e.g. int8,int4_g32+kv_bfloat16), not with --quantization/--kv-cache-dtype")
    if not 1 <= args.stride < args.window:
        raise SystemExit("bench quality: need 1 <= --stride < --window")
    if args.text_tokens < 0 or args.num_prompts < 1 or args.max_tokens < 1:
        raise SystemExit("bench quality: --text-tokens must be >= 0, --num-prompts and --max-tokens >= 1")
    return run(args)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: throughput, classify, quality, kernels, ...")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    _add_throughput(bench_sub)
    _add_classify(bench_sub)
    _add_quality(bench_sub)
    _add_kernels(bench_sub)
    for name in EXTRA_BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # the module (or its package) is absent
                continue
            raise
        module.register(bench_sub)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A parser with only `bench` (for tests and for running this module alone)."""
    parser = argparse.ArgumentParser(prog="python -m batchlm")
    register(parser.add_subparsers(dest="command", required=True))
    return parser
