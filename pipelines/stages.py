"""The two Ray Data stages: read+render+tokenize (CPU actors) and the engine (actor pool).

Contract
--------
Rows flow between the stages as Arrow tables with these internal columns
(every other column is the output id column or a carried input column and
passes through untouched):

    __unit, __row   which work unit and which position in it (ints)
    __ids           the prompt's token ids exactly as the engine gets them
                    (chat template applied, length rule applied), or null
                    when __error is set
    __error         why the row cannot be sent to the engine, or null

- `ReadRender(cfg, id_name, carry)`: a CPU actor that loads the model's
  tokenizer and config only (never its weights), once; per call, a batch of
  unit descriptors -> all their rows, read, given ids, rendered, tokenized
  and length-checked (`PromptEncoder`, the rules of batchlm.prompts). Never
  raises for a bad row.
- `EngineStage`: one `batchlm.LLM` per actor, fed token ids, loaded and
  stepped on a thread of its own (engine_loop.EngineLoop). Its `__call__` is
  async: each call hands its batch's requests to the engine and awaits them,
  and Ray Data runs several calls at once, so the next batch's requests are
  in the engine before the last ones finish (no drain tail per batch). It returns the rows with __ids/__error
  replaced by the output columns; a rejected request (`.error`) becomes that
  row's `error`. For extract (`schema`) each output is parsed and validated
  (extract.Extractor) into one typed column per top-level property; one that
  does not parse or was cut by max_tokens gets `error` and null typed columns,
  and keeps its text, finish_reason and token counts.
  With a `progress_sink` it reports its start-up and each finished row to the
  driver while the batch is still generating (live.StageReporter).
"""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass

from batchlm.outputs import ClassificationOutput
from batchlm.pipelines.engine_loop import EngineLoopStage, EngineRequest
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.extract import Extractor, arrow_schema, column_names
from batchlm.prompts import default_max_model_len, keep_last, label_token_ids, prompt_error, room_after_prompt

INTERNAL = ("__ids", "__error")

# The output columns after the id and the carried columns, in order, with their Arrow types
# ("label_probs": a struct of one float64 per label; extract: one column per schema property, typed by
# extract.py, between these and `error`). The one definition: names and schema come from it.
_GENERATE_COLUMNS = (("generated_text", "string"), ("finish_reason", "string"),
                     ("num_input_tokens", "int32"), ("num_output_tokens", "int32"))
_CLASSIFY_COLUMNS = (("label", "string"), ("label_probs", "label_probs"))
_ERROR_COLUMN = (("error", "string"),)

# How a job config truncates a long prompt (the engine's own remedy is truncate_prompt_tokens).
LONG_PROMPT_REMEDY = "set task.on_long_prompt: truncate to keep the last tokens"


def _columns(task_type: str, schema: dict | None = None) -> tuple[tuple[str, str], ...]:
    """(name, kind) per output column; kind "extract" is a schema property's type (extract.py)."""
    if task_type == "classify":
        task = _CLASSIFY_COLUMNS
    elif task_type == "extract":
        task = tuple((name, "extract") for name in column_names(schema))
    else:
        task = ()
    return _GENERATE_COLUMNS + task + _ERROR_COLUMN


def output_columns(task_type: str, schema: dict | None = None) -> list[str]:
    """The output's own columns for a task (extract: its schema's top-level properties too)."""
    return [name for name, _ in _columns(task_type, schema)]


def output_schema(task_type: str, labels: list[str] | None, schema: dict | None = None):
    import pyarrow as pa

    typed = arrow_schema(schema) if task_type == "extract" else None

    def arrow(name: str, kind: str):
        if kind == "label_probs":
            return pa.struct([pa.field(lb, pa.float64()) for lb in labels or []])
        if kind == "extract":
            return typed.field(name).type
        return getattr(pa, kind)()

    return pa.schema([pa.field(name, arrow(name, kind)) for name, kind in _columns(task_type, schema)])


class StepClock:
    """Time spent inside `engine.step()`: steps, wall seconds and this thread's CPU seconds.

    The unit trace records it (cumulative, per engine process) so `bench pipeline` can tell an
    engine that waits for work (stepping less than the wall time) from one slowed while it steps
    (CPU below wall inside the step: another process had the core)."""

    def __init__(self):
        self.steps = 0
        self.wall_s = 0.0
        self.cpu_s = 0.0

    def step(self, step_fn) -> list:
        """`step_fn()` (an engine's bound `step`), timed."""
        t, c = time.perf_counter(), time.thread_time()
        try:
            return step_fn()
        finally:
            self.steps += 1
            self.wall_s += time.perf_counter() - t
            self.cpu_s += time.thread_time() - c

    def as_dict(self) -> dict:
        return {"steps": self.steps, "step_wall_s": round(self.wall_s, 4), "step_cpu_s": round(self.cpu_s, 4)}


@dataclass(frozen=True)
class EncodedPrompt:
    """One row's prompt as the engine gets it, and what the length rule decided."""
    ids: list[int] | None  # None when `error` is set; the last tokens only when truncated
    num_tokens: int  # the rendered prompt's tokens, before any truncation
    too_long: bool  # over the limit: truncated (on_long_prompt: truncate) or an error
    error: str | None = None


class PromptEncoder:
    """Chat template, tokenization and the length rule (batchlm.prompts), as the job applies them.

    `labels` (classify): each label's tokens follow the prompt, so the longest
    must fit after it; a truncated prompt keeps room for it (generate: for
    max_tokens)."""

    def __init__(self, tok, max_len: int, chat_template: bool | None, on_long_prompt: str,
                 max_tokens: int | None, labels: list[str] | None = None):
        self.tok = tok
        self.max_len = max_len
        self.chat = chat_template if chat_template is not None else bool(getattr(tok, "chat_template", None))
        self.truncate = on_long_prompt == "truncate"
        self.label_ids = label_token_ids(tok, labels) if labels else None
        room = room_after_prompt(max_tokens, self.label_ids)
        self.continuation = room if self.label_ids else 0  # a label must fit; generation stops at the limit
        self.keep = keep_last(max_len, room)

    @classmethod
    def for_task(cls, tok, max_len: int, task_cfg, max_tokens: int | None) -> PromptEncoder:
        labels = [lb.name for lb in task_cfg.labels or []] if task_cfg.type == "classify" else None
        return cls(tok, max_len, task_cfg.chat_template, task_cfg.on_long_prompt, max_tokens, labels)

    @classmethod
    def for_job(cls, cfg) -> PromptEncoder:
        """The job's encoder from the model's tokenizer and config alone (never its weights), with the
        engine's own max_model_len rule; a model that cannot give them is a ConfigError."""
        from batchlm.models.loader import load_config, load_tokenizer
        from batchlm.models.resolve import resolve_model

        try:
            model_dir, _ = resolve_model(cfg.model.name, weights=False)  # a GGUF: config and tokenizer only
            tok, hf = load_tokenizer(model_dir), load_config(model_dir)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"model.name: {e}") from None
        if tok is None:
            raise ConfigError(f"model.name: {cfg.model.name} has no tokenizer files")
        return cls.for_task(tok, default_max_model_len(hf, cfg.model.max_model_len), cfg.task,
                            cfg.sampling.max_tokens)

    def tokens(self, prompt: str, system: str | None) -> list[int]:
        if not self.chat:
            return list(self.tok(prompt)["input_ids"])
        conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt: str, system: str | None) -> EncodedPrompt:
        return self.check(self.tokens(prompt, system))

    def check(self, ids: list[int]) -> EncodedPrompt:
        """The length rule on a tokenized prompt."""
        n = len(ids)
        error = prompt_error(n, self.max_len, self.continuation, LONG_PROMPT_REMEDY)
        too_long = error is not None and n > 0
        if too_long and self.truncate:
            return EncodedPrompt(ids[-self.keep:], n, True)
        return EncodedPrompt(None if error else ids, n, too_long, error)


class ReadRender:
    """Ray Data actor UDF (batch_format="pyarrow", CPU, no engine): units -> rows with token ids."""

    def __init__(self, cfg, id_name: str, carry: list[str]):
        from batchlm.pipelines.render import PromptTemplate

        self.input_cfg, self.id_name, self.carry = cfg.input, id_name, carry
        self.template = PromptTemplate(cfg.task)
        self.encoder = PromptEncoder.for_job(cfg)  # the tokenizer and config only, never the weights

    def encode(self, row: dict) -> EncodedPrompt:
        """One input row -> its prompt's ids, or why it cannot run."""
        if row.get("__error"):
            return EncodedPrompt(None, 0, False, row["__error"])
        prompt, system, error = self.template.render(row)
        if error:
            return EncodedPrompt(None, 0, False, error)
        return self.encoder.encode(prompt, system)

    def __call__(self, batch):
        import pyarrow as pa

        from batchlm.pipelines.sources import Unit, read_unit

        stringify = self.input_cfg.format == "jsonl"  # untyped input: keep carried columns one type
        cols: dict[str, list] = {k: [] for k in ("__unit", "__row", self.id_name, *self.carry, *INTERNAL)}
        for d in batch.to_pylist():
            unit = Unit(**d)
            for i, row in enumerate(read_unit(self.input_cfg, unit)):
                enc = self.encode(row)
                cols["__unit"].append(unit.index)
                cols["__row"].append(i)
                cols[self.id_name].append(row["__id"])
                for c in self.carry:
                    v = row.get(c)
                    cols[c].append(json.dumps(v) if stringify and v is not None and not isinstance(v, str) else v)
                cols["__ids"].append(enc.ids)
                cols["__error"].append(enc.error)
        types = {"__unit": pa.int64(), "__row": pa.int64(), "__ids": pa.list_(pa.int32()), "__error": pa.string()}
        return pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})


class EngineStage(EngineLoopStage):
    """Ray Data actor UDF: one engine per actor, fed continuously across batches."""

    def __init__(self, engine_kwargs: dict, params, task_type: str, labels: list[str] | None,
                 threads: int | None, trace_path: str | None = None, progress_sink=None,
                 schema: dict | None = None):
        self.clock = StepClock()  # time inside engine.step (trace only)
        self._start_engine(engine_kwargs, threads, progress_sink, self.clock)
        self.params = params
        self.task_type = task_type
        self.labels = labels
        self.schema = schema  # extract: the JSON schema (params already carry its constraint)
        self.extractor = Extractor(schema) if task_type == "extract" else None  # compiled once per actor
        self.label_ids = label_token_ids(self.llm.get_tokenizer(), labels) if task_type == "classify" else None
        self.trace_path = trace_path
        self._next = itertools.count()

    def _request(self, ids: list[int]) -> EngineRequest:
        return EngineRequest(f"row-{next(self._next)}", ids, self.params, self.label_ids)

    async def __call__(self, batch):
        # `idle`: how long the engine sat empty (no request to step) before this call.
        trace_units(self.trace_path, batch.column("__unit").to_pylist(), self.engine.take_idle(), self.clock)
        errors = batch.column("__error").to_pylist()
        requests = {i: self._request(ids) for i, ids in enumerate(batch.column("__ids").to_pylist())
                    if errors[i] is None}
        self.report.rows_failed(len(errors) - len(requests))
        # NOTE: Ray Data runs two calls at once per actor; both hand their requests to the one engine,
        # which steps while any is unfinished: the next batch joins before this one's last rows end.
        done = await self.engine.run(list(requests.values()))
        results = {i: done[r.request_id] for i, r in requests.items()}
        return self._table(batch, errors, results)

    def _table(self, batch, errors: list[str | None], results: dict):
        import pyarrow as pa

        n = len(errors)
        out = {c: [None] * n for c in output_columns(self.task_type, self.schema)}
        out["num_input_tokens"] = [0] * n
        out["num_output_tokens"] = [0] * n
        fill = self._fill_classify if self.label_ids is not None else self._fill_generate
        for i, r in results.items():
            if r.error:
                errors[i] = r.error
            else:
                errors[i] = fill(out, i, r)
                self.report.failed_after_finish(errors[i] is not None)
        for i in range(n):
            if errors[i] is not None and out["finish_reason"][i] is None:  # never reached the engine's end
                out["finish_reason"][i] = "error"
        out["error"] = errors
        self.report.flush()
        table = batch.drop_columns(list(INTERNAL))
        schema = output_schema(self.task_type, self.labels, self.schema)
        for name in output_columns(self.task_type, self.schema):
            table = table.append_column(schema.field(name), pa.array(out[name], type=schema.field(name).type))
        return table

    def _fill_generate(self, out: dict, i: int, r) -> str | None:
        """The generate columns; for extract also the typed ones, or why the text does not give them
        (the row's error: its text, finish_reason and token counts are kept)."""
        c = r.outputs[0]
        out["generated_text"][i] = c.text
        out["finish_reason"][i] = c.finish_reason
        out["num_input_tokens"][i] = r.num_prompt_tokens
        out["num_output_tokens"][i] = len(c.token_ids)
        if self.extractor is None:
            return None
        values, error = self.extractor.values(c.text, c.finish_reason)
        for name, v in (values or {}).items():
            out[name][i] = v
        return error

    def _fill_classify(self, out: dict, i: int, score) -> None:  # never an error
        # NOTE: the rendered prompt's own ids were scored as they are: no decode and re-encode (which
        # would add a second BOS on tokenizers that add one, and undo the length rule's work).
        r = ClassificationOutput.from_scores(None, self.labels, score.prompt_token_ids, score.logprobs)
        out["label"][i] = r.label
        out["label_probs"][i] = dict(zip(r.labels, (float(p) for p in r.probs)))
        out["finish_reason"][i] = "stop"
        out["num_input_tokens"][i] = r.num_prompt_tokens


def trace_units(trace_path: str | None, units, idle: float = 0.0, clock: StepClock | None = None) -> None:
    """BATCHLM_UNIT_TRACE: one JSON line per (unit, rows) an engine call generates (a debugging aid);
    `idle` (seconds the engine sat empty before the call) goes on the call's first line, and every
    line carries the engine's StepClock totals so far (when given)."""
    if not trace_path:
        return
    counts: dict[int, int] = {}
    for u in units:
        counts[u] = counts.get(u, 0) + 1
    now = time.time()
    with open(trace_path, "a") as f:  # O_APPEND: whole lines from concurrent actors
        for u, n in sorted(counts.items()):
            line = {"unit": u, "rows": n, "pid": os.getpid(), "t": now, "idle": round(idle, 4)}
            f.write(json.dumps({**line, **(clock.as_dict() if clock else {})}) + "\n")
            idle = 0.0
