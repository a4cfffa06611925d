"""`batchlm validate`: check a config and its input without running the job.

Contract: `validate(cfg, sample=200, estimate=True) -> str` (a report).
Plans the input (row and unit counts), checks the columns the prompt and
`output.carry` use, renders and tokenizes up to `sample` rows (chat template
applied as the run would) for prompt-token statistics and the rows over the
length limit, and, with `estimate`, times the engine on a few of those rows
(at most 8 output tokens each, under the job's own constraint) to estimate the
run time. An extract task's schema was checked when the config loaded; the
report shows the column each top-level property becomes. Nothing is written.
Problems raise ConfigError.
"""
from __future__ import annotations

import statistics
import time

from batchlm.pipelines.render import PromptTemplate
from batchlm.pipelines.runner import check_columns
from batchlm.pipelines.sources import plan_units, read_unit
from batchlm.pipelines.stages import PromptEncoder


def _sample_rows(cfg, units, n: int) -> list[dict]:
    rows: list[dict] = []
    for u in units:
        rows += read_unit(cfg.input, u)
        if len(rows) >= n:
            break
    return rows[:n]


def validate(cfg, sample: int = 200, estimate: bool = True) -> str:
    if cfg.input.format == "openai_batch":  # its requests carry their own prompts and sampling
        from batchlm.pipelines.openai_requests import validate_requests

        return validate_requests(cfg, sample)
    units = plan_units(cfg.input, cfg.output.rows_per_shard)
    total = sum(u.num_rows for u in units)
    rows = _sample_rows(cfg, units, max(1, sample))
    check_columns(cfg, rows)
    template = PromptTemplate(cfg.task)
    enc = PromptEncoder.for_job(cfg)  # the tokenizer and length rules the run's read stage uses
    max_len = enc.max_len
    lengths, errors, too_long, prompts = [], [], 0, []
    for row in rows:
        prompt, system, err = (None, None, row["__error"]) if row.get("__error") else template.render(row)
        if err:
            errors.append(f"{row['__id']}: {err}")
            continue
        ids = enc.tokens(prompt, system)
        checked = enc.check(ids)  # the run's own rule (the engine stage calls it too)
        lengths.append(checked.num_tokens)
        too_long += checked.too_long
        if ids:
            prompts.append(checked.ids if checked.ids is not None else ids[-enc.keep:])
    lines = [
        f"config        ok ({cfg.task.type}, model {cfg.model.name}, max_model_len {max_len})",
        f"input         {cfg.input.path}: {total} rows in {len(units)} work units of <= {cfg.output.rows_per_shard}",
        f"sampled       {len(rows)} rows ({'chat template' if enc.chat else 'no chat template'})",
    ]
    if cfg.task.type == "extract":
        lines += _schema_lines(cfg)
    if lengths:
        q = sorted(lengths)
        lines.append(f"prompt tokens mean {statistics.mean(q):.0f}, median {q[len(q) // 2]}, "
                     f"p95 {q[min(len(q) - 1, int(0.95 * len(q)))]}, max {q[-1]}")
    over = f"{too_long} of {len(lengths)} sampled rows exceed max_model_len {max_len}"
    action = "truncated" if cfg.task.on_long_prompt == "truncate" else "recorded as errors"
    lines.append(f"too long      {over} ({action})")
    lines.append(f"bad rows      {len(errors)} of {len(rows)} sampled rows cannot be rendered")
    lines += [f"              {e}" for e in errors[:5]]
    if estimate and prompts:
        lines.append(_estimate(cfg, prompts[:8], total, statistics.mean(lengths)))
    return "\n".join(lines)


def _schema_lines(cfg) -> list[str]:
    """The extract columns: name and Arrow type, one per top-level property."""
    from batchlm.pipelines.extract import arrow_schema

    where = "inline" if cfg.task.schema is not None else cfg.task.schema_path
    cols = arrow_schema(cfg.task.json_schema)
    lines = [f"schema        ok ({where}): {len(cols)} typed columns"]
    lines += [f"              {f.name}: {f.type}" for f in cols]
    return lines


def _estimate(cfg, prompts: list[list[int]], total_rows: int, mean_prompt: float) -> str:
    """Times a short engine run on a few rows; extrapolates (a rough upper bound)."""
    from batchlm import LLM

    llm = LLM(**cfg.model.engine_kwargs())
    probe_tokens = min(8, cfg.sampling.max_tokens or 8)
    params = cfg.sampling_params()
    # NOTE: a constrained row ends where its grammar does; forcing more tokens past it is not allowed.
    params = params.clone(max_tokens=probe_tokens, ignore_eos=params.structured_outputs is None)
    t0 = time.monotonic()
    llm.generate(prompts, params, use_tqdm=False)
    dt = time.monotonic() - t0
    per_row = dt / len(prompts)
    out_tokens = cfg.sampling.max_tokens or 256
    # prefill is ~the probe's share for prompt tokens; decode scales with max_tokens.
    row_s = per_row * (mean_prompt + out_tokens) / (mean_prompt + probe_tokens)
    lo, _ = cfg.resources.replica_range()
    est = total_rows * row_s / lo
    return (f"estimate      ~{est / 60:.1f} min for {total_rows} rows on {lo} replica(s) "
            f"(probe: {len(prompts)} rows x {probe_tokens} tokens in {dt:.1f} s on this machine; "
            f"assumes every row writes max_tokens={out_tokens}, a batch as small as the probe; "
            "full batches run faster)")
