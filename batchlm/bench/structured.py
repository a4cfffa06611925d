"""`bench throughput --json-schema FILE`: constrained vs unconstrained output
in one run.

Contract: `load_schema(path)` reads and checks the schema (SystemExit naming
the file and the problem). `structured_row(llm, schema, work, ...)` times
`LLM.generate` on the same engine and prompts as the plain batchlm row, greedy,
with `structured_outputs=json:schema` (the grammar is compiled in a warm-up
request first, like the model load it is not in the figures), each repeat
right after an unconstrained run of the same prompts, and returns the table
row (the median pair) and a summary: the median of the pairs' output tokens/s
ratios (constrained / unconstrained), how many
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


def structured_row(llm, schema: dict, work, repeats: int, flops_of, gflops) -> tuple[Row, dict]:
    from batchlm import SamplingParams, StructuredOutputsParams

    params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens, ignore_eos=work.ignore_eos,
                            structured_outputs=StructuredOutputsParams(json=schema))
    llm.generate([[t % 1000 + 100 for t in range(24)]], params.clone(max_tokens=2), use_tqdm=False)
    print(f"[bench] batchlm json-schema generate on {len(work.prompts)} prompts ...", flush=True)

    plain_params = params.clone(structured_outputs=None)

    def timed(p):
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.generate(work.prompts, p, use_tqdm=False)
        return time.perf_counter() - t0, outs

    # NOTE: pairs (unconstrained, constrained) back to back, the ratio per pair:
    # on a shared machine a slow spell then hits both runs of a pair.
    # "matched": unconstrained again, each row made to generate exactly as many
    # tokens as its constrained run did (ignore_eos): same schedule, so the ratio
    # is the grammar's own cost; the plain ratio also carries the outputs' lengths.
    pairs, matched = [], []
    for _ in range(max(1, repeats)):
        wp, plain_outs = timed(plain_params)
        wc, outs = timed(params)
        n_plain = sum(len(o.outputs[0].token_ids) for o in plain_outs)
        n_con = sum(len(o.outputs[0].token_ids) for o in outs)
        same_len = [plain_params.clone(max_tokens=max(1, len(o.outputs[0].token_ids)), ignore_eos=True)
                    for o in outs]
        wm, _ = timed(same_len)
        n_m = sum(p.max_tokens for p in same_len)
        pairs.append(((n_con / wc) / (n_plain / wp), wc, outs))
        matched.append((n_con / wc) / (n_m / wm))
        print(f"[bench]   unconstrained {n_plain / wp:.2f} tok/s, constrained {n_con / wc:.2f} tok/s, "
              f"unconstrained with the constrained lengths {n_m / wm:.2f} tok/s", flush=True)
    pairs.sort(key=lambda x: x[0])
    ratio, wall, outs = pairs[len(pairs) // 2]
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
    return row, {"ratio_output_tokens_per_s": ratio, "pair_ratios": [round(p[0], 3) for p in pairs],
                 "ratio_same_lengths": sorted(matched)[len(matched) // 2],
                 "same_lengths_ratios": [round(m, 3) for m in matched],
                 "valid": valid, "outputs": len(comps), "cut_by_max_tokens": cut, "validated_with": how,
                 "grammars_compiled": llm.engine.structured.num_compiled}
