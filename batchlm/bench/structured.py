"""`bench throughput --json-schema FILE`: constrained vs unconstrained output
in one run.

Contract: `load_schema(path)` reads and checks the schema (SystemExit naming
the file and the problem). `structured_row(llm, schema, work, ...)` times
`LLM.generate` on the same engine and prompts as the plain batchlm row, greedy,
with `structured_outputs=json:schema` (the grammar is compiled in a warm-up
request first, like the model load it is not in the figures), and returns the
table row and a summary: output tokens/s ratio to the plain row, how many
outputs parse and validate (`jsonschema` when installed, else parse + object
only), how many were cut by max_tokens.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from batchlm.bench.report import Row


def load_schema(path: str) -> dict:
    from batchlm import StructuredOutputsParams

    try:
        schema = json.loads(Path(path).read_text())
        StructuredOutputsParams(json=schema)
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench throughput: --json-schema {path}: {e}") from None
    return schema


def _validator(schema: dict):
    try:
        import jsonschema
    except ImportError:  # not a base dependency: parse and type check only
        return lambda value: isinstance(value, dict), "parse only (jsonschema not installed)"
    v = jsonschema.validators.validator_for(schema)(schema)
    return v.is_valid, "jsonschema"


def structured_row(llm, schema: dict, work, repeats: int, flops_of, gflops, plain: Row) -> tuple[Row, dict]:
    from batchlm import SamplingParams, StructuredOutputsParams
    from batchlm.bench.throughput import _median_run

    params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens, ignore_eos=work.ignore_eos,
                            structured_outputs=StructuredOutputsParams(json=schema))
    llm.generate([[t % 1000 + 100 for t in range(24)]], params.clone(max_tokens=2), use_tqdm=False)
    print(f"[bench] batchlm json-schema generate on {len(work.prompts)} prompts ...", flush=True)

    def once():
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(work.prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, outs

    wall, outs = _median_run(once, repeats)
    comps = [o.outputs[0] for o in outs]
    n_out = sum(len(c.token_ids) for c in comps)
    is_valid, how = _validator(schema)
    valid = 0
    for c in comps:
        try:
            valid += bool(c.finish_reason == "stop" and is_valid(json.loads(c.text)))
        except ValueError:
            pass
    cut = sum(c.finish_reason == "length" for c in comps)
    print(f"[bench]   {n_out} output tokens in {wall:.1f} s: {n_out / wall:.2f} tok/s; "
          f"{valid}/{len(comps)} valid ({how}), {cut} cut by max_tokens", flush=True)
    row = Row("batchlm json-schema", len(outs), work.num_prompt_tokens, n_out, wall,
              f"{valid}/{len(comps)} valid, {cut} cut by max_tokens",
              flops_of(work.num_prompt_tokens, n_out) / wall / 1e9 / gflops)
    return row, {"ratio_output_tokens_per_s": row.output_tokens_per_s / plain.output_tokens_per_s,
                 "valid": valid, "outputs": len(comps), "cut_by_max_tokens": cut, "validated_with": how,
                 "grammars_compiled": llm.engine.structured.num_compiled}
