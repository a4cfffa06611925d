"""`bench quality`: perplexity and greedy agreement of precision configs against float32.

Contract: `run(args)` builds one `LLM` per config of `--configs` (float32
first, always: it is the reference), one at a time. For each it
- scores the committed text (`load_text()`, tokenized once with the reference
  model's tokenizer, no special tokens added) in windows of `--window` tokens
  with `--stride` (see `windows`), through the engine with
  `SamplingParams(max_tokens=1, prompt_logprobs=0)`, and reports
  PPL = exp(mean NLL over the scored tokens) and its change vs float32 in %;
- generates `--max-tokens` greedy tokens (eos stops) for `--num-prompts`
  chat summarization prompts (workload.py) and reports the fraction of
  outputs token-identical to float32's and their mean common prefix;
- reports the model's weight bytes (parameters and buffers) and their ratio
  to float32's.
A config whose `LLM(...)` raises ValueError or NotImplementedError (e.g. a
quantization that is not built) gets a row that says "not available: ..."
and the others still run. Returns a process exit code; with `--json` the
results are written there too.

NOTE: a window prefilled in one step attends to its fresh keys and values,
not to the KV cache, so a `+kv_<dtype>` suffix changes the perplexity only
where chunked prefill splits a window across steps; greedy decoding reads the
cache at every step, so the agreement columns show it.

Config items (`parse_config`): a dtype name (float32, bfloat16, float16,
auto) gives `dtype=`; any other word gives `quantization=<word>` with
`dtype=--dtype`; a suffix `+kv_<dtype>` gives `kv_cache_dtype=<dtype>`, and
`+dense_head` after a quantization keeps the embedding table and LM head
unquantized (`lm_head: false`), and `+dense_layerN` decoder layer N
(`dense_layers: [N]`; the suffix may repeat with other layers).

This module imports only the standard library at import time; torch and the
engine are imported inside the functions that need them.
"""
from __future__ import annotations

import gc
import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources

from batchlm.bench.report import command_line, write_json

TEXT_NAME = "loc_workshop_electronic_texts_1992.txt"
REFERENCE = "float32"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_UNAVAILABLE = (ValueError, NotImplementedError)


# ---- the text -------------------------------------------------------------------
def text_resource(name: str = TEXT_NAME):
    """The packaged text file (an importlib.resources Traversable); see data/SOURCE.md."""
    return resources.files("batchlm.bench").joinpath("data", name)


def load_text(name: str = TEXT_NAME) -> str:
    return text_resource(name).read_text(encoding="utf-8")


# ---- windows --------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """One window: tokens [begin, end) go through the model; the tokens at
    positions [score_from, end) are scored (their logprob given all earlier
    tokens of the window)."""
    begin: int
    end: int
    score_from: int

    @property
    def num_scored(self) -> int:
        return self.end - self.score_from


def windows(num_tokens: int, window: int, stride: int) -> list[Span]:
    """Windows of `window` tokens starting every `stride` tokens, until one
    reaches the end. Each token 1..num_tokens-1 is scored exactly once (token
    0 has nothing before it): the first window scores all its tokens but the
    first, every later one only the tokens no earlier window reached, each
    with at least window - stride tokens of context (so stride < window: a
    window's first token has nothing before it in the window)."""
    if not 1 <= stride < window:
        raise ValueError(f"need 1 <= stride < window, got window={window}, stride={stride}")
    spans, begin, scored_to = [], 0, 1
    while scored_to < num_tokens:
        end = min(begin + window, num_tokens)
        if end > scored_to:
            spans.append(Span(begin, end, scored_to))
            scored_to = end
        begin += stride
    return spans


# ---- configs --------------------------------------------------------------------
DENSE_HEAD = "dense_head"  # suffix: the embedding table and LM head stay unquantized (lm_head=False)
DENSE_LAYER = "dense_layer"  # suffix dense_layerN: decoder layer N stays unquantized (dense_layers)


def parse_config(item: str, dtype: str = "auto") -> dict:
    """One `--configs` item -> kwargs for `LLM(model, ...)`. Raises ValueError
    on a malformed item (not on an unknown quantization: the engine decides)."""
    base, *suffixes = item.strip().split("+")
    if not base or len(set(suffixes)) < len(suffixes):
        raise ValueError(f"config {item!r}: expected WORD, then +kv_DTYPE, +{DENSE_HEAD} or +{DENSE_LAYER}N")
    kwargs = {"dtype": base} if base in DTYPES else {"quantization": base, "dtype": dtype}
    changes: dict = {}
    for suffix in suffixes:
        layer = suffix.removeprefix(DENSE_LAYER)
        if suffix == DENSE_HEAD and "quantization" in kwargs:
            changes["lm_head"] = False
        elif layer != suffix and "quantization" in kwargs and layer.lstrip("-").isdigit():
            changes["dense_layers"] = (*changes.get("dense_layers", ()), int(layer))
        elif suffix.startswith("kv_") and len(suffix) > 3 and "kv_cache_dtype" not in kwargs:
            kwargs["kv_cache_dtype"] = suffix[3:]
        else:
            raise ValueError(f"config {item!r}: a suffix is one +kv_<dtype>, or after a quantization "
                             f"+{DENSE_HEAD} or +{DENSE_LAYER}N, got +{suffix}")
    if changes:
        import dataclasses

        from batchlm.quantization.config import parse_quantization

        kwargs["quantization"] = dataclasses.replace(parse_quantization(base), **changes)
    return kwargs


def parse_configs(text: str, dtype: str = "auto") -> list[tuple[str, dict]]:
    """The comma-separated list -> [(name, kwargs)], float32 first and once."""
    names = [REFERENCE]
    for item in text.split(","):
        item = item.strip()
        if item and item not in names:
            names.append(item)
    return [(name, parse_config(name, dtype)) for name in names]


# ---- measurements -----------------------------------------------------------------
def score_tokens(llm, ids: list[int], window: int, stride: int) -> list[float | None]:
    """logprob of ids[i] given what precedes it in its window, for every i
    (None at 0), from the engine's prompt_logprobs."""
    from batchlm import SamplingParams

    spans = windows(len(ids), window, stride)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([ids[s.begin:s.end] for s in spans], params, use_tqdm=False)
    logprobs: list[float | None] = [None] * len(ids)
    for s, out in zip(spans, outs):
        if out.error or out.prompt_logprobs is None:
            raise RuntimeError(f"window [{s.begin}, {s.end}) failed: {out.error or 'no prompt_logprobs'}")
        for pos in range(s.score_from, s.end):
            if logprobs[pos] is not None:
                raise RuntimeError(f"token {pos} scored twice")
            # prompt_logprobs[j]: {token: lp} for the window's token j (j >= 1).
            logprobs[pos] = out.prompt_logprobs[pos - s.begin][ids[pos]]
    missing = [i for i in range(1, len(ids)) if logprobs[i] is None]
    if missing:
        raise RuntimeError(f"{len(missing)} tokens not scored, e.g. {missing[:5]}")
    return logprobs


def perplexity(logprobs: list[float | None]) -> tuple[float, int]:
    """(exp(mean NLL), tokens) over the entries that are not None."""
    scored = [lp for lp in logprobs if lp is not None]
    if not scored:
        raise ValueError("no scored tokens")
    return math.exp(-math.fsum(scored) / len(scored)), len(scored)


def weight_bytes(llm) -> int | None:
    """Bytes of the engine model's parameters and buffers (each tensor once), when it exposes them."""
    model = getattr(getattr(llm, "engine", None), "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    from batchlm.quantization.apply import weight_bytes as module_bytes

    return module_bytes(model)


def describe(llm) -> str:
    """What the engine computes in, e.g. "bfloat16, int8 weights, kv bfloat16"."""
    engine = llm.engine
    parts = [str(getattr(engine, "dtype", "?")).removeprefix("torch.")]
    quant = getattr(getattr(engine, "loaded", None), "quantization", None)
    if quant:
        parts.append(f"{getattr(quant, 'name', quant)} weights")
    try:
        parts.append("kv " + str(engine.runner.kv_caches[0][0].dtype).removeprefix("torch."))
    except (AttributeError, IndexError, TypeError):
        pass
    return ", ".join(parts)


def agreement(reference: list[list[int]], outputs: list[list[int]]) -> tuple[int, float]:
    """(how many outputs equal their reference token for token, mean length of
    the common prefix in tokens)."""
    same, prefixes = 0, []
    for a, b in zip(reference, outputs):
        same += a == b
        prefixes.append(next((k for k, (u, v) in enumerate(zip(a, b)) if u != v), min(len(a), len(b))))
    return same, (sum(prefixes) / len(prefixes) if prefixes else 0.0)


# ---- rows -----------------------------------------------------------------------------
@dataclass
class QualityRow:
    name: str
    kwargs: dict
    tokens_scored: int = 0
    ppl: float | None = None
    ppl_delta_pct: float | None = None
    identical: int | None = None
    compared: int = 0
    mean_common_prefix: float | None = None
    mean_output_tokens: float | None = None
    weight_bytes: int | None = None
    engine: str | None = None  # what the engine runs: dtype, quantization, KV cache dtype
    weight_ratio: float | None = None
    wall_s: float | None = None  # scoring + generation, model load excluded
    note: str = ""
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def available(self) -> bool:
        return self.ppl is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["outputs"]
        d["available"] = self.available
        return d


_COLUMNS = ("config", "engine", "tokens", "ppl", "d ppl", "greedy same", "common prefix", "weights MB",
            "vs fp32", "wall s", "note")


def format_table(rows: list[QualityRow]) -> str:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    cells = [_COLUMNS]
    for r in rows:
        same = "" if r.identical is None else f"{r.identical}/{r.compared}"
        cells.append((r.name, r.engine or "", str(r.tokens_scored) if r.available else "", num(r.ppl, ".4f"),
                      num(r.ppl_delta_pct, "+.3f") + ("%" if r.ppl_delta_pct is not None else ""),
                      same, num(r.mean_common_prefix, ".1f"),
                      num(None if r.weight_bytes is None else r.weight_bytes / 1e6, ".1f"),
                      num(r.weight_ratio, ".3f") + ("x" if r.weight_ratio is not None else ""),
                      num(r.wall_s, ".1f"), r.note))
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i in (0, 1, 10) else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---- the command ------------------------------------------------------------------------
def _measure(llm, row: QualityRow, ids, work, args, ref: QualityRow | None) -> None:
    from batchlm import SamplingParams

    row.engine = describe(llm)
    t0 = time.perf_counter()
    print(f"[bench] {row.name} ({row.engine}): scoring {len(ids)} tokens ...", flush=True)
    row.ppl, row.tokens_scored = perplexity(score_tokens(llm, ids, args.window, args.stride))
    print(f"[bench] {row.name}: ppl {row.ppl:.4f}; greedy on {len(work.prompts)} prompts ...", flush=True)
    params = SamplingParams(temperature=0.0, max_tokens=work.max_tokens, ignore_eos=False)
    outs = llm.generate(work.prompts, params, use_tqdm=False)
    row.wall_s = time.perf_counter() - t0
    errors = [o.error for o in outs if o.error]
    if errors:
        row.note = f"{len(errors)} generations failed: {errors[0]}"
    row.outputs = [list(o.outputs[0].token_ids) if o.outputs else [] for o in outs]
    row.mean_output_tokens = sum(map(len, row.outputs)) / max(1, len(row.outputs))
    row.weight_bytes = weight_bytes(llm)
    ref = ref or row
    row.ppl_delta_pct = 100.0 * (row.ppl / ref.ppl - 1.0)
    row.identical, row.mean_common_prefix = agreement(ref.outputs, row.outputs)
    row.compared = len(row.outputs)
    if row.weight_bytes is not None and ref.weight_bytes:
        row.weight_ratio = row.weight_bytes / ref.weight_bytes


def run(args) -> int:
    import torch

    from batchlm import LLM
    from batchlm.bench.workload import summarization_workload

    try:
        configs = parse_configs(args.configs, args.dtype)
    except ValueError as e:
        raise SystemExit(f"bench quality: {e}")
    text = load_text()
    common = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_memory=args.kv_cache_memory, seed=args.seed, compile_model=args.compile)
    rows: list[QualityRow] = []
    ref = ids = work = model_dir = None
    for name, kwargs in configs:
        row = QualityRow(name, kwargs)
        rows.append(row)
        print(f"[bench] {name}: LLM({args.model!r}, {', '.join(f'{k}={v!r}' for k, v in kwargs.items())})",
              flush=True)
        try:
            llm = LLM(model=args.model, **kwargs, **common)
        except _UNAVAILABLE as e:
            if ref is None:
                raise SystemExit(f"bench quality: the float32 reference cannot be built: {e}")
            row.note = f"not available: {e}"
            print(f"[bench] {name}: {row.note}", flush=True)
            continue
        if ref is None:  # the reference: tokenize and build the workload once
            model_dir = llm.model_dir
            tokenizer = llm.get_tokenizer()
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            total_tokens = len(ids)
            if args.text_tokens:
                ids = ids[:args.text_tokens]
            if len(ids) < 2:
                raise SystemExit("bench quality: the text has fewer than 2 tokens")
            if args.window > llm.max_model_len:
                raise SystemExit(f"bench quality: --window {args.window} is more than the model's "
                                 f"max_model_len ({llm.max_model_len})")
            lo, hi = args.prompt_len_range
            work = summarization_workload(tokenizer, args.num_prompts, lo, hi, args.max_tokens, args.seed)
        _measure(llm, row, ids, work, args, ref)
        ref = ref or row
        del llm
        gc.collect()

    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    print(f"\ncommand:  {command_line(args.argv)}")
    print(f"model:    {args.model} ({model_dir}); quantized configs with dtype {args.dtype}")
    print(f"text:     {TEXT_NAME} (sha256 {digest[:12]}, see batchlm/bench/data/SOURCE.md): "
          f"{len(ids)} of {total_tokens} tokens, windows of {args.window} every {args.stride} "
          f"({len(windows(len(ids), args.window, args.stride))} windows; each token scored once, "
          f"with >= {min(args.window - args.stride, len(ids))} tokens of context after the first window)")
    print(f"greedy:   {work.description}; float32 made {ref.mean_output_tokens:.1f} tokens per prompt on average")
    print(f"machine:  torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(format_table(rows))
    print("\nd ppl: change vs float32; greedy same: outputs token-identical to float32's; "
          "common prefix: mean tokens before the first difference")
    if any("kv_cache_dtype" in r.kwargs for r in rows):
        print("+kv_<dtype>: a window prefilled in one step does not read the KV cache, so its "
              "effect shows mostly in the greedy columns")
    if args.json:
        write_json(args.json, {
            "command": command_line(args.argv), "model": args.model, "model_dir": model_dir,
            "dtype": args.dtype, "text": TEXT_NAME, "text_sha256": digest, "text_tokens": total_tokens,
            "tokens_used": len(ids), "window": args.window, "stride": args.stride,
            "workload": work.description, "num_prompts": len(work.prompts), "max_tokens": args.max_tokens,
            "threads": torch.get_num_threads(), "rows": [r.to_dict() for r in rows]})
        print(f"\nwrote {args.json}")
    return 0
