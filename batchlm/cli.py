"""`python -m batchlm run|validate|status|bench|generate`.

Each subcommand lives with the code it drives; this module only assembles the
parser. `run`, `validate` and `status` come from batchlm.pipelines.cli (they need
Ray/pyarrow/pydantic, imported only when those commands run); `bench` from
batchlm.bench.cli; `generate` is a small demo of the engine on its own.
"""
from __future__ import annotations

import argparse
import sys


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with the engine (demo)")
    p.add_argument("prompts", nargs="*", help="prompts (default: a few examples)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from batchlm import LLM, SamplingParams

    prompts = args.prompts or [
        "Summarize in one sentence: the quick brown fox jumps over the lazy dog.",
        "What is the capital of France?",
        "Write a haiku about batch inference.",
    ]
    llm = LLM(model=args.model)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if args.no_chat:
        outs = llm.generate(prompts, params)
    else:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    for p, o in zip(prompts, outs):
        print(f"### {p}\n{o.outputs[0].text}\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m batchlm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    # NOTE: both modules import only the standard library at import time.
    from batchlm.bench.cli import register as register_bench
    from batchlm.pipelines.cli import register as register_pipeline

    register_pipeline(sub)
    register_bench(sub)
    _add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
