"""OpenAI Batch API output lines, and the engine stage that makes them.

Contract
--------
- `response_line(req, result, tok, created) -> dict`: the Batch API's output
  line for a served request: `{"id": "batch_req_...", "custom_id",
  "response": {"status_code": 200, "request_id", "body"}, "error": None}`,
  the body a `chat.completion` (choices with `message`) or a `text_completion`
  (choices with `text`), each with `id`, `object`, `created`, `model` (the
  request's body.model), `choices` (index, finish_reason, logprobs) and
  `usage`; shaped so the official `openai` client's own types validate it.
- `error_line(req, code, message) -> dict`: the line of a request that could
  not run: `"response": None, "error": {"code", "message"}`.
- Ids are derived from the line's place in the input (`Request.line`), so a
  rerun writes the same ids.
- Logprobs: each token's text is its own decode (a token that is part of one
  UTF-8 character decodes to U+FFFD, as OpenAI's `token` does); `bytes` are
  that text's UTF-8 bytes.
- `BatchEngineStage`: the Ray Data actor for `input.format: openai_batch`;
  one `batchlm.LLM` per actor, loaded and stepped on a thread of its own
  (engine_loop.EngineLoop). Its `__call__` is async: each call hands every
  runnable request of its batch to the engine, one SamplingParams per
  request, and awaits them, while the next call's requests join: chat
  requests through the model's chat template (`LLM.apply_chat_template`, as
  `LLM.chat` does), completions as raw text or token ids. The engine's own
  length and empty-prompt rules decide what it refuses. It returns the rows
  with `__request` replaced by LINE_COLUMN (the JSON line), `error`,
  `num_input_tokens` and `num_output_tokens`. With a `progress_sink` it reports
  each finished request to the driver while generating (live.StageReporter).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import time

from batchlm.pipelines.engine_loop import EngineLoopStage, EngineRequest
from batchlm.pipelines.openai_requests import REQUEST_COLUMN, Request

LINE_COLUMN = "line"
OUTPUT_COLUMNS = (LINE_COLUMN, "error", "num_input_tokens", "num_output_tokens")
_FINISH = {"stop": "stop", "length": "length"}


def _key(req: Request) -> str:
    return hashlib.sha256(req.line.encode()).hexdigest()[:24]


def error_line(req: Request, code: str, message: str) -> dict:
    return {"id": f"batch_req_{_key(req)}", "custom_id": req.custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _token(tok, token_id: int, logprob: float) -> dict:
    text = tok.decode([token_id])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def _top(position: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(position.items(), key=lambda kv: -kv[1])[:k]


def _chat_logprobs(tok, c, k: int) -> dict:
    content = []
    for tid, pos in zip(c.token_ids, c.logprobs or []):
        entry = _token(tok, tid, pos.get(tid, -9999.0))
        entry["top_logprobs"] = [_token(tok, t, lp) for t, lp in _top(pos, k)]
        content.append(entry)
    return {"content": content, "refusal": None}


def _completion_logprobs(tok, c, k: int) -> dict:
    tokens, lps, tops, offsets, at = [], [], [], [], 0
    for tid, pos in zip(c.token_ids, c.logprobs or []):
        text = tok.decode([tid])
        tokens.append(text)
        lps.append(pos.get(tid, -9999.0))
        tops.append({tok.decode([t]): lp for t, lp in _top(pos, k)})
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def response_line(req: Request, result, tok, created: int) -> dict:
    """The output line of a request the engine served (`result`: its RequestOutput)."""
    choices = []
    for c in result.outputs:
        lp = None
        if req.top_logprobs is not None:
            lp = (_chat_logprobs if req.chat else _completion_logprobs)(tok, c, req.top_logprobs)
        choice = {"index": c.index, "finish_reason": _FINISH[c.finish_reason], "logprobs": lp}
        if req.chat:
            choice["message"] = {"role": "assistant", "content": c.text, "refusal": None}
        else:
            choice["text"] = c.text
        choices.append(choice)
    completion = sum(len(c.token_ids) for c in result.outputs)
    usage = {"prompt_tokens": result.num_prompt_tokens, "completion_tokens": completion,
             "total_tokens": result.num_prompt_tokens + completion}
    key = _key(req)
    body = {"id": f"chatcmpl-{key}" if req.chat else f"cmpl-{key}",
            "object": "chat.completion" if req.chat else "text_completion",
            "created": created, "model": req.model, "choices": choices, "usage": usage}
    return {"id": f"batch_req_{key}", "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{key}", "body": body}, "error": None}


def output_schema():
    import pyarrow as pa

    return pa.schema([pa.field(LINE_COLUMN, pa.string()), pa.field("error", pa.string()),
                      pa.field("num_input_tokens", pa.int32()), pa.field("num_output_tokens", pa.int32())])


class BatchEngineStage(EngineLoopStage):
    """Ray Data actor UDF for openai_batch: one engine per actor, loaded and stepped on a thread of its
    own (engine_loop.EngineLoop), fed continuously across batches (async: Ray Data runs two calls at once)."""

    def __init__(self, engine_kwargs: dict, threads: int | None, trace_path: str | None = None,
                 progress_sink=None):
        self._start_engine(engine_kwargs, threads, progress_sink)
        self.tok = self.llm.get_tokenizer()
        self.vocab = int(self.llm.engine.hf_config.vocab_size)
        self.trace_path = trace_path
        self._next = itertools.count()

    def _prompt(self, req: Request):
        """The engine's prompt (text or token ids) for a request; ValueError naming why it cannot run."""
        if req.chat:
            if not getattr(self.tok, "chat_template", None):
                raise ValueError(f"the model has no chat template; send {req.url} requests as /v1/completions")
            try:
                text = self.llm.apply_chat_template(req.messages)
            except Exception as e:  # a template's own raise_exception, or a malformed conversation
                raise ValueError(f"the model's chat template refused the messages: {e}") from None
            return self.llm.engine.tokenize(text, add_special_tokens=False)
        if isinstance(req.prompt, list):
            bad = [t for t in req.prompt if not 0 <= t < self.vocab]
            if bad:
                raise ValueError(f"body.prompt: token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        return req.prompt

    async def __call__(self, batch):
        import pyarrow as pa

        from batchlm import SamplingParams
        from batchlm.pipelines.stages import trace_units

        trace_units(self.trace_path, batch.column("__unit").to_pylist())
        reqs = [Request.from_json(s) for s in batch.column(REQUEST_COLUMN).to_pylist()]
        n = len(reqs)
        lines: list[dict | None] = [None] * n
        out = {"error": [None] * n, "num_input_tokens": [0] * n, "num_output_tokens": [0] * n}
        todo, requests = [], []
        for i, req in enumerate(reqs):
            if req.error_code:
                lines[i], out["error"][i] = error_line(req, req.error_code, req.error), req.error
                continue
            try:
                prompt = self._prompt(req)
            except ValueError as e:
                lines[i], out["error"][i] = error_line(req, "invalid_prompt", str(e)), str(e)
                continue
            todo.append(i)
            requests.append(EngineRequest(f"req-{next(self._next)}", prompt, SamplingParams(**req.params)))
        self.report.rows_failed(n - len(todo))
        done = await self.engine.run(requests)
        results = [done[r.request_id] for r in requests]
        self.report.flush()
        created = int(time.time())
        for i, r in zip(todo, results):
            req = reqs[i]
            out["num_input_tokens"][i] = r.num_prompt_tokens
            unfinished = [c.finish_reason for c in r.outputs if c.finish_reason not in _FINISH]
            if r.error or unfinished:
                why = r.error or f"the engine ended a choice with finish_reason {unfinished[0]!r}"
                lines[i], out["error"][i] = error_line(req, "invalid_prompt" if r.error else "engine_error", why), why
                continue
            lines[i] = response_line(req, r, self.tok, created)
            out["num_output_tokens"][i] = sum(len(c.token_ids) for c in r.outputs)
        out[LINE_COLUMN] = [json.dumps(line, ensure_ascii=False) for line in lines]
        table = batch.drop_columns([REQUEST_COLUMN])
        schema = output_schema()
        for name in OUTPUT_COLUMNS:
            table = table.append_column(schema.field(name), pa.array(out[name], type=schema.field(name).type))
        return table
