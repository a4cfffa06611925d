"""OpenAI Batch API requests in: one input line -> a checked `Request`, or the line's error.

Contract
--------
- An input line (`input.format: openai_batch`, JSON Lines read by sources.py
  with the one line rule) is `{"custom_id", "method": "POST", "url", "body"}`,
  `url` one of CHAT_URL and COMPLETIONS_URL. `parse_request(row, duplicate_of,
  default_model) -> Request` never raises: a line that cannot run comes back
  with `error_code` and `error` (a message naming the problem and the field):
  invalid JSON, a missing or non-text custom_id, a custom_id used on an
  earlier line (`duplicate_of`: that line), another method or url, an unknown
  request or body field (reported, never ignored), a bad message or prompt,
  or a sampling value out of its range (SamplingParams' own rules, restated
  under the body's field name).
- Body fields served (BODY_FIELDS): chat `messages` (roles system, developer,
  user, assistant; content text or text parts), completion `prompt` (text,
  one-text list, or token ids); `model` (echoed in the response; the job's
  model serves every line), `max_tokens`, `max_completion_tokens` (chat),
  `temperature`, `top_p`, `n`, `stop`, `seed`, `presence_penalty`,
  `frequency_penalty`, `logprobs` (chat: true/false; completion: top-k),
  `top_logprobs` (chat), `response_format` (chat: text, json_object or json_schema ->
  structured outputs, the schema checked here). A missing max_tokens is OpenAI's default: none for
  chat (up to max_model_len), 16 for completions. `null` is the same as absent.
- `Request` is plain data (JSON between the Ray stages: `to_json`/`from_json`);
  `params` are SamplingParams keyword arguments, already checked.
- `find_duplicates(input_cfg, units) -> {line: first line}` scans the whole
  plan once (every line of every unit, in plan order), so a duplicate is
  found across units and the same line is the duplicate on every run.
- `read_requests(batch, ...)`: the Ray Data read stage: unit descriptors ->
  one row per line: `__unit`, `__row`, the id column (custom_id, or the
  line's `<file>#<row>` when it has none) and `__request` (Request JSON).

It knows nothing of tokens, the engine or the output lines (openai_responses.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from batchlm import StructuredOutputsParams
from batchlm.sampling_params import SamplingParams

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
REQUEST_COLUMN = "__request"

_SAMPLING = ("max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty")
BODY_FIELDS = {
    CHAT_URL: ("model", "messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
               *_SAMPLING),
    COMPLETIONS_URL: ("model", "prompt", "logprobs", *_SAMPLING),
}
_DEFAULT_MAX_TOKENS = {CHAT_URL: None, COMPLETIONS_URL: 16}  # OpenAI's own defaults
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_NUMBERS = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INTEGERS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs")


@dataclass(frozen=True)
class Request:
    line: str  # where the request is: "<file>#<row>" (rows count from 0, blank lines skipped)
    custom_id: str | None = None
    url: str | None = None  # CHAT_URL or COMPLETIONS_URL
    model: str | None = None  # body.model (or the job's model): echoed in the response
    messages: list[dict] | None = None  # chat: [{role, content}] with text content
    prompt: str | list[int] | None = None  # completion: text or token ids
    params: dict = field(default_factory=dict)  # SamplingParams keyword arguments, checked
    top_logprobs: int | None = None  # alternatives per token in the response; None: no logprobs
    error_code: str | None = None
    error: str | None = None

    @property
    def chat(self) -> bool:
        return self.url == CHAT_URL

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Request":
        return cls(**json.loads(text))


class _Bad(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def parse_request(row: dict, duplicate_of: str | None = None, default_model: str | None = None) -> Request:
    """One input line (as sources.read_unit gives it) -> a Request, with error_code/error when it cannot run."""
    line = row["__id"]
    cid = row.get("custom_id") if not row.get("__error") else None
    cid = cid if isinstance(cid, str) and cid else None
    try:
        return _parse(row, line, cid, duplicate_of, default_model)
    except _Bad as e:
        return Request(line, cid, error_code=e.code, error=str(e))


def _parse(row: dict, line: str, cid: str | None, duplicate_of: str | None, default_model: str | None) -> Request:
    if row.get("__error"):
        raise _Bad("invalid_json", f"row {line}: {row['__error']}")
    if "custom_id" not in row or row["custom_id"] is None:
        raise _Bad("missing_custom_id", f"row {line}: custom_id is missing; every request needs one")
    if cid is None:
        raise _Bad("invalid_custom_id", f"row {line}: custom_id must be a non-empty string")
    if duplicate_of:
        raise _Bad("duplicate_custom_id", f"custom_id {cid!r} is already used on row {duplicate_of}; "
                                          "each request needs its own")
    extra = sorted(k for k in row if k not in ("custom_id", "method", "url", "body", "__id"))
    if extra:
        raise _Bad("unsupported_field", f"request field(s) {', '.join(extra)} not supported; a request line has "
                                        "custom_id, method, url and body")
    if row.get("method") != "POST":
        raise _Bad("invalid_method", f"method {row.get('method')!r}: the Batch API takes POST")
    url = row.get("url")
    if url not in BODY_FIELDS:
        raise _Bad("invalid_url", f"url {url!r} is not served; batchlm serves {CHAT_URL} and {COMPLETIONS_URL}")
    body = row.get("body")
    if not isinstance(body, dict):
        raise _Bad("invalid_body", "body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # NOTE: OpenAI treats null as absent
    unsupported = sorted(k for k in body if k not in BODY_FIELDS[url])
    if unsupported:
        raise _Bad("unsupported_field", f"body field(s) {', '.join(unsupported)} not supported by batchlm for "
                                        f"{url}; supported: {', '.join(BODY_FIELDS[url])}")
    model = body.get("model", default_model)
    if not isinstance(model, str):
        raise _Bad("invalid_value", "body.model must be a string")
    params, top = _sampling(body, url)
    if url == CHAT_URL:
        return Request(line, cid, url, model, messages=_messages(body), params=params, top_logprobs=top)
    return Request(line, cid, url, model, prompt=_prompt(body), params=params, top_logprobs=top)


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Bad("invalid_messages", "body.messages must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        where = f"body.messages[{i}]"
        if not isinstance(m, dict):
            raise _Bad("invalid_messages", f"{where} must be an object with role and content")
        extra = sorted(k for k in m if k not in ("role", "content"))
        if extra:
            raise _Bad("unsupported_field", f"{where}: field(s) {', '.join(extra)} not supported (role, content)")
        if m.get("role") not in _ROLES:
            raise _Bad("invalid_messages", f"{where}.role {m.get('role')!r} not supported; roles: "
                                           f"{', '.join(_ROLES)}")
        out.append({"role": _ROLES[m["role"]], "content": _text(m.get("content"), f"{where}.content")})
    return out


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(isinstance(p, dict) for p in content):
        kinds = sorted({str(p.get("type")) for p in content} - {"text"})
        if kinds:
            raise _Bad("unsupported_field", f"{where}: part type(s) {', '.join(kinds)} not supported (text only)")
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise _Bad("invalid_messages", f"{where} must be text or a list of {{type: text, text}} parts")


def _prompt(body: dict) -> str | list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    if isinstance(p, list) and len(p) > 1:
        raise _Bad("invalid_prompt", "body.prompt: one prompt per request line (a list of prompts is not served)")
    raise _Bad("invalid_prompt", "body.prompt must be text or a list of token ids")


def _sampling(body: dict, url: str) -> tuple[dict, int | None]:
    """SamplingParams keyword arguments from the body, checked; and the logprobs shown per token."""
    for name in _NUMBERS:
        if name in body and (isinstance(body[name], bool) or not isinstance(body[name], (int, float))):
            raise _Bad("invalid_value", f"body.{name} must be a number")
    for name in _INTEGERS:
        if name in body and (isinstance(body[name], bool) or not isinstance(body[name], int)):
            raise _Bad("invalid_value", f"body.{name} must be an integer")
    stop = body.get("stop")
    texts = isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    if stop is not None and not (isinstance(stop, str) or texts):
        raise _Bad("invalid_value", "body.stop must be a string or a list of strings")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise _Bad("invalid_value", "body: give max_tokens or max_completion_tokens, not both")
    length_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    params = {k: body[k] for k in _SAMPLING if k in body}
    params["max_tokens"] = body.get(length_field, _DEFAULT_MAX_TOKENS[url])
    top = _logprobs(body, url)
    if top is not None:
        params["logprobs"] = top
    constraint = _response_format(body.get("response_format"))
    if constraint is not None:
        try:
            StructuredOutputsParams(**constraint)  # the schema checked here, named as the body's field
        except ValueError as e:
            raise _Bad("invalid_value", f"body.response_format: {e}") from None
        params["structured_outputs"] = constraint
    try:
        SamplingParams(**params)
    except TypeError as e:  # a type the checks above let through
        raise _Bad("invalid_value", f"body: {e}") from None
    except ValueError as e:
        name, _, rest = str(e).removeprefix("SamplingParams.").partition(" ")
        name = length_field if name == "max_tokens" else name
        raise _Bad("invalid_value", f"body.{name} {rest}") from None
    return params, top


def _response_format(rf) -> dict | None:
    """Chat's `response_format` -> batchlm's structured_outputs (None: free text).

    `{"type": "text"}`: no constraint; `{"type": "json_object"}`: any JSON object;
    `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`: the schema (checked by the
    caller, through StructuredOutputsParams)."""
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise _Bad("invalid_value", "body.response_format.json_schema.schema must be a JSON schema object")
        return {"json": schema}
    raise _Bad("invalid_value", "body.response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} "
                                "or {\"type\": \"json_schema\", \"json_schema\": {\"schema\": ...}}")


def _logprobs(body: dict, url: str) -> int | None:
    lp = body.get("logprobs")
    if url == COMPLETIONS_URL:
        if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 5):
            raise _Bad("invalid_value", "body.logprobs must be an integer from 0 to 5")
        return lp
    if lp is not None and not isinstance(lp, bool):
        raise _Bad("invalid_value", "body.logprobs must be true or false")
    top = body.get("top_logprobs")
    if top is not None and not 0 <= top <= 20:
        raise _Bad("invalid_value", "body.top_logprobs must be from 0 to 20")
    if top is not None and not lp:
        raise _Bad("invalid_value", "body.top_logprobs needs logprobs: true")
    return (top or 0) if lp else None


def find_duplicates(input_cfg, units) -> dict[str, str]:
    """{line: the earlier line with its custom_id} over the whole plan, in plan order."""
    from batchlm.pipelines.sources import read_unit

    first: dict[str, str] = {}
    dups: dict[str, str] = {}
    for unit in units:
        for row in read_unit(input_cfg, unit):
            cid = row.get("custom_id") if not row.get("__error") else None
            if isinstance(cid, str) and cid:
                if cid in first:
                    dups[row["__id"]] = first[cid]
                else:
                    first[cid] = row["__id"]
    return dups


def read_requests(batch, input_cfg, duplicates: dict[str, str], default_model: str, id_name: str):
    """Ray Data map_batches fn (batch_format="pyarrow"): units -> one row per request line."""
    import pyarrow as pa

    from batchlm.pipelines.sources import Unit, read_unit

    cols: dict[str, list] = {k: [] for k in ("__unit", "__row", id_name, REQUEST_COLUMN)}
    for d in batch.to_pylist():
        unit = Unit(**d)
        for i, row in enumerate(read_unit(input_cfg, unit)):
            req = parse_request(row, duplicates.get(row["__id"]), default_model)
            cols["__unit"].append(unit.index)
            cols["__row"].append(i)
            cols[id_name].append(req.custom_id or req.line)
            cols[REQUEST_COLUMN].append(req.to_json())
    return pa.table(cols)


def validate_requests(cfg, sample: int = 200) -> str:
    """`batchlm validate` for an openai_batch input: counts, and what the first `sample` lines ask or lack."""
    from collections import Counter

    from batchlm.pipelines.sources import plan_input, read_unit

    plan = plan_input(cfg.input, cfg.output.rows_per_shard)
    dups = find_duplicates(cfg.input, plan.units)
    reqs: list[Request] = []
    for unit in plan.units:
        reqs += [parse_request(row, dups.get(row["__id"]), cfg.model.name) for row in read_unit(cfg.input, unit)]
        if len(reqs) >= sample:
            break
    reqs = reqs[:max(1, sample)]
    bad = [r for r in reqs if r.error_code]
    kinds = Counter(r.url for r in reqs if not r.error_code)
    lines = [
        f"config        ok (openai_batch, model {cfg.model.name} serves every request)",
        f"input         {cfg.input.path}: {plan.total_rows} requests in {len(plan.units)} work units of "
        f"<= {cfg.output.rows_per_shard}; {len(dups)} duplicate custom_id(s) in all",
        f"sampled       {len(reqs)} requests: {kinds[CHAT_URL]} chat, {kinds[COMPLETIONS_URL]} completions",
        f"bad requests  {len(bad)} of {len(reqs)} sampled cannot run (written as error lines)",
    ]
    lines += [f"              {r.custom_id or r.line}: {r.error_code}: {r.error}" for r in bad[:5]]
    lines.append("prompt tokens not counted here: the engine checks each prompt against max_model_len as it runs")
    return "\n".join(lines)
