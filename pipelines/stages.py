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
  With a `progress_sink` it reports its start-up and each finished row to the
  driver while the batch is still generating (live.StageReporter).
"""
from __future__ import annotations

import json
import os
import time

INTERNAL = ("__prompt", "__system", "__error")


def output_columns(task_type: str) -> list[str]:
    extra = ["label", "label_probs"] if task_type == "classify" else []
    return ["generated_text", "finish_reason", "num_input_tokens", "num_output_tokens", *extra, "error"]


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


class PromptEncoder:
    """Chat template, tokenization and the length rule, as the engine stage applies them."""

    def __init__(self, tok, max_len: int, chat_template: bool | None, on_long_prompt: str, max_tokens: int | None):
        self.tok = tok
        self.max_len = max_len
        self.chat = chat_template if chat_template is not None else bool(getattr(tok, "chat_template", None))
        self.truncate = on_long_prompt == "truncate"
        # Room for the output: a truncated prompt keeps max_model_len - max_tokens tokens.
        self.keep = max(1, max_len - (max_tokens or 1))

    def tokens(self, prompt: str, system: str | None) -> list[int]:
        if not self.chat:
            return list(self.tok(prompt)["input_ids"])
        conv = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = self.tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prepare(self, prompt: str, system: str | None) -> tuple[list[int] | None, str | None]:
        """(token ids, None), or (None, the row's error)."""
        ids = self.tokens(prompt, system)
        if not ids:
            return None, "prompt is empty"
        if len(ids) > self.max_len:
            if not self.truncate:
                return None, (f"prompt has {len(ids)} tokens, more than max_model_len={self.max_len}; "
                              "set task.on_long_prompt: truncate to keep the last tokens")
            ids = ids[-self.keep:]
        return ids, None


class EngineStage:
    """Ray Data actor UDF: one engine per actor, a whole batch per engine call."""

    def __init__(self, engine_kwargs: dict, params, task_type: str, labels: list[str] | None,
                 chat_template: bool | None, on_long_prompt: str, threads: int | None,
                 trace_path: str | None = None, progress_sink=None):
        from batchlm.pipelines.live import StageReporter

        t0 = time.monotonic()
        if threads:
            import torch

            torch.set_num_threads(threads)
        from batchlm import LLM

        self.llm = LLM(**engine_kwargs)
        self.enc = PromptEncoder(self.llm.get_tokenizer(), int(self.llm.max_model_len), chat_template,
                                 on_long_prompt, params.max_tokens if task_type == "generate" else 1)
        self.params = params
        self.task_type = task_type
        self.labels = labels
        self.trace_path = trace_path
        self.report = StageReporter(progress_sink)  # live progress to the driver (live.py)
        self.report.engine_up(time.monotonic() - t0)

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
                ids, errors[i] = self.enc.prepare(prompts[i], systems[i])
                if ids is not None:
                    todo.append(i)
                    inputs.append(ids)
                    out["num_input_tokens"][i] = len(ids)
        self.report.rows_failed(n - len(todo))
        if self.task_type == "generate":
            self._generate(todo, inputs, out, errors)
        else:
            self._classify(todo, inputs, out, errors)
        for i in range(n):
            if errors[i] is not None:
                out["finish_reason"][i] = "error"
        out["error"] = errors
        self.report.flush()
        table = batch.drop_columns(list(INTERNAL))
        schema = _output_schema(self.task_type, self.labels)
        for name in output_columns(self.task_type):
            table = table.append_column(schema.field(name), pa.array(out[name], type=schema.field(name).type))
        return table

    def _generate(self, todo, inputs, out, errors) -> None:
        results = self.llm.generate(inputs, self.params, use_tqdm=False,
                                     on_finished=self.report.finished) if inputs else []
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
        texts = [self.enc.tok.decode(ids) for ids in inputs]
        results = self.llm.classify(texts, self.labels, use_tqdm=False,
                                     on_finished=self.report.finished) if texts else []
        for i, r in zip(todo, results):
            if r.error:
                errors[i] = r.error
                continue
            out["label"][i] = r.label
            out["label_probs"][i] = dict(zip(r.labels, (float(p) for p in r.probs)))
            out["finish_reason"][i] = "stop"
            out["num_input_tokens"][i] = r.num_prompt_tokens or out["num_input_tokens"][i]


def _output_schema(task_type: str, labels: list[str] | None):
    import pyarrow as pa

    fields = [
        pa.field("generated_text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("num_input_tokens", pa.int32()),
        pa.field("num_output_tokens", pa.int32()),
    ]
    if task_type == "classify":
        fields += [pa.field("label", pa.string()),
                   pa.field("label_probs", pa.struct([pa.field(lb, pa.float64()) for lb in labels]))]
    return pa.schema(fields + [pa.field("error", pa.string())])


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
