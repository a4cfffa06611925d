"""The two Ray Data stages: read+render (CPU tasks) and the engine (actor pool).

Contract
--------
Rows flow between the stages as Arrow tables with these internal columns
(every other column is the output id column or a carried input column and
passes through untouched):

    __unit, __row   which work unit and which position in it (ints)
    __prompt        the rendered prompt text, or null when __error is set
    __system        the rendered system message, or null
    __error         why the row cannot be sent to the engine, or null

- `read_render(batch, ...)`: a batch of unit descriptors -> all their rows,
  read, given ids and rendered. Never raises for a bad row.
- `EngineStage`: builds one `batchlm.LLM` per actor; per call it applies the
  chat template, tokenizes, enforces the length limit (error or keep the
  last tokens), runs generate/classify over the whole batch and returns the
  rows with __prompt/__system/__error replaced by the output columns.
  A rejected request (RequestOutput.error) becomes that row's `error`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from batchlm.prompts import keep_last, label_token_ids, prompt_error, room_after_prompt

INTERNAL = ("__prompt", "__system", "__error")

# The output columns after the id and the carried columns, in order, with their Arrow types
# ("label_probs": a struct of one float64 per label). The one definition: names and schema come from it.
_GENERATE_COLUMNS = (("generated_text", "string"), ("finish_reason", "string"),
                     ("num_input_tokens", "int32"), ("num_output_tokens", "int32"))
_CLASSIFY_COLUMNS = (("label", "string"), ("label_probs", "label_probs"))
_ERROR_COLUMN = (("error", "string"),)

# How a job config truncates a long prompt (the engine's own remedy is truncate_prompt_tokens).
LONG_PROMPT_REMEDY = "set task.on_long_prompt: truncate to keep the last tokens"


def _columns(task_type: str) -> tuple[tuple[str, str], ...]:
    return _GENERATE_COLUMNS + (_CLASSIFY_COLUMNS if task_type == "classify" else ()) + _ERROR_COLUMN


def output_columns(task_type: str) -> list[str]:
    return [name for name, _ in _columns(task_type)]


def output_schema(task_type: str, labels: list[str] | None):
    import pyarrow as pa

    def arrow(kind: str):
        if kind == "label_probs":
            return pa.struct([pa.field(lb, pa.float64()) for lb in labels or []])
        return getattr(pa, kind)()

    return pa.schema([pa.field(name, arrow(kind)) for name, kind in _columns(task_type)])


def read_render(batch, input_cfg, task_cfg, id_name: str, carry: list[str]):
    """Ray Data map_batches fn (batch_format="pyarrow"): units -> rendered rows."""
    import pyarrow as pa

    from batchlm.pipelines.render import PromptTemplate
    from batchlm.pipelines.sources import Unit, read_unit

    template = PromptTemplate(task_cfg)
    stringify = input_cfg.format == "jsonl"  # untyped input: keep carried columns one type
    cols: dict[str, list] = {k: [] for k in ("__unit", "__row", id_name, *carry, *INTERNAL)}
    for d in batch.to_pylist():
        unit = Unit(**d)
        for i, row in enumerate(read_unit(input_cfg, unit)):
            prompt, system, error = (None, None, row["__error"]) if row.get("__error") else template.render(row)
            cols["__unit"].append(unit.index)
            cols["__row"].append(i)
            cols[id_name].append(row["__id"])
            for c in carry:
                v = row.get(c)
                cols[c].append(json.dumps(v) if stringify and v is not None and not isinstance(v, str) else v)
            cols["__prompt"].append(prompt)
            cols["__system"].append(system)
            cols["__error"].append(error)
    return pa.table(cols)


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


class EngineStage:
    """Ray Data actor UDF: one engine per actor, a whole batch per engine call."""

    def __init__(self, engine_kwargs: dict, params, task_type: str, labels: list[str] | None,
                 chat_template: bool | None, on_long_prompt: str, threads: int | None,
                 trace_path: str | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        from batchlm import LLM

        self.llm = LLM(**engine_kwargs)
        self.enc = PromptEncoder(self.llm.get_tokenizer(), int(self.llm.max_model_len), chat_template,
                                 on_long_prompt, params.max_tokens, labels)
        self.params = params
        self.task_type = task_type
        self.labels = labels
        self.trace_path = trace_path

    def _trace(self, units) -> None:
        trace_units(self.trace_path, units)

    def __call__(self, batch):
        import pyarrow as pa

        self._trace(batch.column("__unit").to_pylist())
        prompts, systems = batch.column("__prompt").to_pylist(), batch.column("__system").to_pylist()
        errors = batch.column("__error").to_pylist()
        n = len(errors)
        out = {c: [None] * n for c in output_columns(self.task_type)}
        out["num_input_tokens"] = [0] * n
        out["num_output_tokens"] = [0] * n
        todo, inputs = [], []
        for i in range(n):
            if errors[i] is None:
                enc = self.enc.encode(prompts[i], systems[i])
                errors[i] = enc.error
                if enc.ids is not None:
                    todo.append(i)
                    inputs.append(enc.ids)
                    out["num_input_tokens"][i] = len(enc.ids)
        if self.task_type == "generate":
            self._generate(todo, inputs, out, errors)
        else:
            self._classify(todo, inputs, out, errors)
        for i in range(n):
            if errors[i] is not None:
                out["finish_reason"][i] = "error"
        out["error"] = errors
        table = batch.drop_columns(list(INTERNAL))
        schema = output_schema(self.task_type, self.labels)
        for name in output_columns(self.task_type):
            table = table.append_column(schema.field(name), pa.array(out[name], type=schema.field(name).type))
        return table

    def _generate(self, todo, inputs, out, errors) -> None:
        results = self.llm.generate(inputs, self.params, use_tqdm=False) if inputs else []
        for i, r in zip(todo, results):
            if r.error:
                errors[i] = r.error
                continue
            c = r.outputs[0]
            out["generated_text"][i] = c.text
            out["finish_reason"][i] = c.finish_reason
            out["num_input_tokens"][i] = r.num_prompt_tokens
            out["num_output_tokens"][i] = len(c.token_ids)

    def _classify(self, todo, inputs, out, errors) -> None:
        # NOTE: the rendered prompt's own ids, scored as they are: no decode and re-encode (which
        # would add a second BOS on tokenizers that add one, and undo the length rule's work).
        results = self.llm.classify(inputs, self.labels, use_tqdm=False) if inputs else []
        for i, r in zip(todo, results):
            if r.error:
                errors[i] = r.error
                continue
            out["label"][i] = r.label
            out["label_probs"][i] = dict(zip(r.labels, (float(p) for p in r.probs)))
            out["finish_reason"][i] = "stop"
            out["num_input_tokens"][i] = r.num_prompt_tokens


def trace_units(trace_path: str | None, units) -> None:
    """BATCHLM_UNIT_TRACE: one JSON line per (unit, rows) an engine call generates (a debugging aid)."""
    if not trace_path:
        return
    counts: dict[int, int] = {}
    for u in units:
        counts[u] = counts.get(u, 0) + 1
    with open(trace_path, "a") as f:  # O_APPEND: whole lines from concurrent actors
        for u, n in sorted(counts.items()):
            f.write(json.dumps({"unit": u, "rows": n, "pid": os.getpid(), "t": time.time()}) + "\n")
