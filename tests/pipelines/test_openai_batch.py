"""OpenAI Batch files in and out: the config rules, each request line's checks,
response bodies checked with the official `openai` client's own types, and a
round trip through `batchlm run` killed with SIGKILL mid-run and resumed:
every request line answered exactly once, failed lines as error lines, JSON
Lines shards under the same commit protocol (damage found, manifest rebuilt)."""
from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from batchlm.pipelines.config import parse_config, result_fields
from batchlm.pipelines.errors import ConfigError
from batchlm.pipelines.openai_requests import CHAT_URL, COMPLETIONS_URL, parse_request

from .helpers import CLI, cli, write_yaml
from .procs import kill_driver, start_driver
from .test_s3 import s3  # noqa: F401  (the moto S3 fixture)

MODEL = "gpt-4o-mini"  # what the user's file names: echoed, never looked up


def _chat(cid: str, text: str, **body) -> dict:
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": text}]
    return {"custom_id": cid, "method": "POST", "url": CHAT_URL, "body": {"model": MODEL, "messages": msgs, **body}}


def _completion(cid: str, prompt, **body) -> dict:
    return {"custom_id": cid, "method": "POST", "url": COMPLETIONS_URL,
            "body": {"model": MODEL, "prompt": prompt, **body}}


def _job(model_dir: str, requests: str, out: str, **output) -> dict:
    return {"input": {"format": "openai_batch", "path": requests},
            "model": {"name": model_dir, "max_model_len": 256, "kv_cache_memory": 1 << 24},
            "resources": {"batch_size": 4, "cpus_per_replica": 1},
            "output": {"path": out, "rows_per_shard": 4, **output}}


# --- config ------------------------------------------------------------------------------------------


def _config_error(raw: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    return str(e.value)


def test_config_needs_only_input_model_output(tmp_path):
    cfg = parse_config(_job("m", "r.jsonl", "o"))
    assert cfg.task is None and cfg.output_format == "openai_batch"
    fields = result_fields(cfg)
    assert fields["output"]["format"] == "openai_batch" and fields["task"] is None
    plain = parse_config({"input": {"format": "jsonl", "path": "x"}, "task": {"prompt": "x"}, "output": {"path": "o"}})
    assert plain.output_format == "parquet" and "format" not in result_fields(plain)["output"]


@pytest.mark.parametrize("change, field", [
    ({"task": {"prompt": "{{ text }}"}}, "task:"),
    ({"sampling": {"max_tokens": 8}}, "sampling:"),
    ({"output": {"path": "o", "format": "parquet"}}, "output.format:"),
    ({"output": {"path": "o", "carry": ["x"]}}, "output.carry:"),
    ({"output": {"path": "o", "compression": "gzip"}}, "output.compression:"),
    ({"input": {"format": "openai_batch", "path": "r.jsonl", "id_column": "custom_id"}}, "input.id_column:"),
])
def test_bad_combinations_with_openai_batch_name_the_field(change, field):
    msg = _config_error({**_job("m", "r.jsonl", "o"), **change})
    assert field in msg and "openai_batch" in msg, msg


def test_other_inputs_still_need_a_task_and_parquet_output():
    base = {"input": {"format": "jsonl", "path": "x"}, "output": {"path": "o"}}
    assert "task: required key is missing" in _config_error(base)
    msg = _config_error({**base, "task": {"prompt": "x"}, "output": {"path": "o", "format": "openai_batch"}})
    assert "output.format:" in msg and "input.format: openai_batch" in msg


# --- request lines -----------------------------------------------------------------------------------


def _row(obj: dict, where: str = "r.jsonl#0") -> dict:
    return {**obj, "__id": where}


@pytest.mark.parametrize("obj, code, words", [
    ({"__error": "invalid JSON: Expecting value"}, "invalid_json", ["invalid JSON"]),
    ({k: v for k, v in _chat("x", "hi").items() if k != "custom_id"}, "missing_custom_id", ["custom_id"]),
    ({**_chat("x", "hi"), "custom_id": 7}, "invalid_custom_id", ["custom_id"]),
    ({**_chat("x", "hi"), "method": "GET"}, "invalid_method", ["GET", "POST"]),
    ({**_chat("x", "hi"), "url": "/v1/embeddings"}, "invalid_url", ["/v1/embeddings", CHAT_URL]),
    (_chat("x", "hi", logit_bias={"1": 5}, tools=[]), "unsupported_field", ["logit_bias", "tools"]),
    ({**_chat("x", "hi"), "priority": 1}, "unsupported_field", ["priority"]),
    (_chat("x", "hi", max_tokens=0), "invalid_value", ["body.max_tokens"]),
    (_chat("x", "hi", max_completion_tokens=-1), "invalid_value", ["body.max_completion_tokens"]),
    (_chat("x", "hi", temperature="hot"), "invalid_value", ["body.temperature"]),
    (_chat("x", "hi", top_p=3), "invalid_value", ["body.top_p"]),
    (_chat("x", "hi", top_logprobs=3), "invalid_value", ["top_logprobs", "logprobs: true"]),
    (_completion("x", "hi", logprobs=True), "invalid_value", ["body.logprobs"]),
    (_completion("x", ["a", "b"]), "invalid_prompt", ["one prompt per request"]),
    (_completion("x", "hi", messages=[]), "unsupported_field", ["messages"]),
    (_completion("x", "hi", response_format={"type": "json_object"}), "unsupported_field", ["response_format"]),
    (_chat("x", "hi", response_format={"type": "yaml"}), "invalid_value", ["body.response_format"]),
    (_chat("x", "hi", response_format={"type": "json_schema", "json_schema": {"name": "n"}}), "invalid_value",
     ["response_format.json_schema.schema"]),
    (_chat("x", "hi", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}),
     "invalid_value", ["body.response_format"]),
    ({**_chat("x", "hi"), "body": {"messages": [{"role": "tool", "content": "x"}]}}, "invalid_messages", ["tool"]),
    ({**_chat("x", "hi"), "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}},
     "unsupported_field", ["image_url"]),
])
def test_each_bad_request_line_is_named(obj, code, words):
    req = parse_request(_row(obj), None, "job-model")
    assert req.error_code == code, req
    assert all(w in req.error for w in words), req.error


def test_good_lines_become_engine_params():
    chat = parse_request(_row(_chat("a", "hi", max_completion_tokens=5, temperature=0.5, seed=3, stop="\n",
                                    logprobs=True, top_logprobs=2, n=2)), None, "job-model")
    assert chat.error is None and chat.model == MODEL and chat.top_logprobs == 2
    assert chat.params == {"max_tokens": 5, "temperature": 0.5, "seed": 3, "stop": "\n", "n": 2, "logprobs": 2}
    comp = parse_request(_row({**_completion("b", [1, 2, 3]), "body": {"prompt": [1, 2, 3]}}), None, "job-model")
    assert comp.error is None and comp.model == "job-model" and comp.params == {"max_tokens": 16}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    typed = parse_request(_row(_chat("c", "hi", response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}})), None, "m")
    assert typed.error is None and typed.params["structured_outputs"] == {"json": schema}
    obj = parse_request(_row(_chat("d", "hi", response_format={"type": "json_object"})), None, "m")
    assert obj.params["structured_outputs"] == {"json_object": True}
    text = parse_request(_row(_chat("e", "hi", response_format={"type": "text"})), None, "m")
    assert "structured_outputs" not in text.params
    dup = parse_request(_row(_chat("a", "again")), "r.jsonl#0", "m")
    assert dup.error_code == "duplicate_custom_id" and "r.jsonl#0" in dup.error


# --- the round trip, killed and resumed --------------------------------------------------------------


def _requests() -> tuple[list[str], dict[str, str]]:
    """Request lines (as text) and, for the lines that must fail, the words their error names."""
    lines: list[str] = []
    expect_error: dict[str, str] = {}
    for i in range(56):
        if i % 2:
            extra = {"n": 2} if i % 7 == 1 else ({"logprobs": 2} if i % 5 == 1 else {})
            lines.append(json.dumps(_completion(f"req-{i}", f"Story {i}:", max_tokens=4 + i % 4,
                                                temperature=0.0, **extra)))
        else:
            extra = {"logprobs": True, "top_logprobs": 2} if i % 6 == 0 else {}
            lines.append(json.dumps(_chat(f"req-{i}", f"Say {i}", max_completion_tokens=4 + i % 3,
                                          temperature=0.7, seed=i, top_p=0.9, stop=["\n\n"], **extra)))
    bad = {
        "bad-field": (_chat("bad-field", "x", logit_bias={"5": 1}), "logit_bias"),
        "bad-url": ({**_chat("bad-url", "x"), "url": "/v1/embeddings"}, "/v1/embeddings"),
        "too-long": (_completion("too-long", "y" * 400, max_tokens=4), "max_model_len"),
        "req-4": (_chat("req-4", "a second request with this id"), "already used"),
    }
    for pos, (cid, (obj, words)) in zip((3, 9, 17, 25), bad.items()):
        lines.insert(pos, json.dumps(obj))
        expect_error[cid] = words
    no_id = {k: v for k, v in _chat("-", "x").items() if k != "custom_id"}
    lines.insert(6, '{"custom_id": "broken-json", "method": "POST", "url": ')  # cut off: not JSON
    lines.insert(12, json.dumps(no_id))
    lines.insert(20, "this line is not JSON at all")
    return lines, expect_error


def _shards(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*.jsonl")} if out.exists() else {}


def _traced_units(trace: Path) -> set[int]:
    return {json.loads(x)["unit"] for x in trace.read_text().splitlines() if x.strip()} if trace.exists() else set()


def _wait(cond, timeout: float, what: str, log: Path) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def _check_line(line: dict) -> None:
    assert line["id"].startswith("batch_req_")
    cid = line["custom_id"]
    if line["error"] is not None:
        assert line["response"] is None and line["error"]["code"] and line["error"]["message"]
        return
    resp = line["response"]
    assert resp["status_code"] == 200 and resp["request_id"].startswith("req_")
    body = resp["body"]
    assert body["model"] == MODEL  # echoed: the job's model served it
    if body["object"] == "chat.completion":
        parsed = ChatCompletion.model_validate(body)
        assert parsed.choices[0].message.role == "assistant"
        if int(cid.split("-")[1]) % 6 == 0:
            assert parsed.choices[0].logprobs is not None and parsed.choices[0].logprobs.content
            assert all(len(t.top_logprobs) == 2 for t in parsed.choices[0].logprobs.content)
    else:
        parsed = Completion.model_validate(body)
        assert parsed.object == "text_completion"
        i = int(cid.split("-")[1])
        assert len(parsed.choices) == (2 if i % 7 == 1 else 1)
        if i % 5 == 1 and i % 7 != 1:
            assert parsed.choices[0].logprobs is not None and len(parsed.choices[0].logprobs.tokens) == \
                parsed.usage.completion_tokens
    assert parsed.usage.total_tokens == parsed.usage.prompt_tokens + parsed.usage.completion_tokens > 0
    assert all(c.finish_reason in ("stop", "length") for c in parsed.choices)


@pytest.mark.ray_cluster
def test_round_trip_killed_and_resumed(tmp_path, tiny_model):
    lines, expect_error = _requests()
    requests = tmp_path / "batch_requests.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "job.yaml", _job(tiny_model, str(requests), str(out)))
    units = -(-len(lines) // 4)
    log = tmp_path / "driver.log"

    # 1. killed (SIGKILL) once two shards are committed
    proc = start_driver([*CLI, "run", cfg], {**os.environ, "BATCHLM_UNIT_TRACE": str(tmp_path / "t0.jsonl")}, log)
    _wait(lambda: len(_shards(out)) >= 2 or proc.poll() is not None, 400, "two shards", log)
    kill_driver(proc)
    before = _shards(out)
    assert 2 <= len(before) < units, f"the kill should land mid-run; log:\n{log.read_text()[-3000:]}"

    # 2. the same command again finishes the rest, never redoing a committed unit
    trace = tmp_path / "t1.jsonl"
    proc = start_driver([*CLI, "run", cfg], {**os.environ, "BATCHLM_UNIT_TRACE": str(trace)}, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert {n: _shards(out).get(n) for n in before} == before, "a committed shard was rewritten"
    assert not _traced_units(trace) & {int(n[5:11]) for n in before}, "a committed unit was generated again"
    assert (out / "_SUCCESS").exists() and not list(out.glob(".batchlm-tmp-*"))

    got = [json.loads(x) for p in sorted(out.glob("part-*.jsonl")) for x in p.read_text().splitlines()]
    assert len(got) == len(lines) and len({g["id"] for g in got}) == len(lines)  # each line answered once
    sent = Counter(json.loads(x).get("custom_id") for x in lines if x.startswith("{") and x.endswith("}"))
    sent.pop(None, None)
    assert Counter(g["custom_id"] for g in got if g["custom_id"] is not None) == sent
    for g in got:
        _check_line(g)
    errors = [g for g in got if g["error"] is not None]
    assert len(errors) == 7  # two broken JSON lines, a missing custom_id, and the four in expect_error
    by_id = {g["custom_id"]: g for g in errors}
    for cid, words in expect_error.items():
        assert words in by_id[cid]["error"]["message"], by_id[cid]
    assert by_id["bad-field"]["error"]["code"] == "unsupported_field"
    assert sum(g["error"]["code"] == "invalid_json" for g in errors) == 2
    assert sum(g["error"]["code"] == "missing_custom_id" for g in errors) == 1
    assert sum(g["custom_id"] == "req-4" and g["error"] is None for g in got) == 1  # the first one is served
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["units"]) == units and sum(u["errors"] for u in manifest["units"].values()) == 7

    _damage_is_found_and_the_manifest_rebuilt(cfg, out)


def _damage_is_found_and_the_manifest_rebuilt(cfg: str, out: Path) -> None:
    """The JSON Lines shards under the resume checks (in process: no engine needed)."""
    from batchlm.pipelines.config import load_config
    from batchlm.pipelines.output import open_output
    from batchlm.pipelines.runner import prepare
    from batchlm.pipelines.status import status
    from batchlm.pipelines.storage import Store

    job = prepare(load_config(cfg))
    total = job.expected.total_units
    cut, flip = out / "part-000001.jsonl", out / "part-000002.jsonl"
    cut.write_bytes(cut.read_bytes()[:-10])  # truncated
    data = bytearray(flip.read_bytes())
    data[5] ^= 1  # same size, one bit
    flip.write_bytes(bytes(data))
    text, complete = status(str(out))
    assert not complete and "damaged     part-000001.jsonl: size" in text and "part-000002.jsonl" in text, text
    (out / "_manifest.json").unlink()  # and rebuilt from the shards' own records
    opened = open_output(Store(str(out)), job.expected)
    notes = "\n".join(opened.notes)
    assert "rebuilding it from" in notes and "part-000001.jsonl is damaged" in notes, notes
    assert "part-000002.jsonl is damaged: unreadable" in notes and "sha256" in notes, notes
    assert sorted(opened.manifest.units) == [u for u in range(total) if u not in (1, 2)]
    assert not (out / "_SUCCESS").exists() and len(list((out / "_damaged").iterdir())) == 2


def test_engine_stage_answers_token_prompts_and_names_what_it_cannot_run(tmp_path, tiny_model):
    """The engine stage in process (no Ray): token-id prompts, per-request params, and the
    prompts only the model can judge (ids outside its vocabulary, no chat template)."""
    import shutil

    import pyarrow as pa

    from batchlm.pipelines.openai_requests import REQUEST_COLUMN
    from batchlm.pipelines.openai_responses import LINE_COLUMN, BatchEngineStage

    def stage(model_dir: str, *objs: dict):
        reqs = [parse_request(_row(o, f"r.jsonl#{i}"), None, "m") for i, o in enumerate(objs)]
        batch = pa.table({"__unit": [0] * len(reqs), "__row": list(range(len(reqs))),
                          "id": [r.custom_id for r in reqs], REQUEST_COLUMN: [r.to_json() for r in reqs]})
        engine = {"model": model_dir, "max_model_len": 256, "kv_cache_memory": 1 << 24}
        out = asyncio.run(BatchEngineStage(engine, threads=1)(batch))  # async, as Ray Data runs it
        assert out.column_names == ["__unit", "__row", "id", "line", "error", "num_input_tokens",
                                    "num_output_tokens"]
        return [json.loads(x) for x in out[LINE_COLUMN].to_pylist()], out

    ok, out = stage(tiny_model, _completion("ids", [72, 105], max_tokens=3, temperature=0, logprobs=1),
                    _completion("oov", [72, 9999]), _chat("c", "hi", max_tokens=2, n=3, temperature=1.0, seed=5))
    first = Completion.model_validate(ok[0]["response"]["body"])
    assert first.usage.prompt_tokens == 2 and first.usage.completion_tokens == len(first.choices[0].logprobs.tokens)
    assert all(len(top) <= 2 for top in first.choices[0].logprobs.top_logprobs)  # the token and the top 1
    assert ok[1]["error"]["code"] == "invalid_prompt" and "9999" in ok[1]["error"]["message"]
    chat = ChatCompletion.model_validate(ok[2]["response"]["body"])
    assert [c.index for c in chat.choices] == [0, 1, 2] and chat.usage.completion_tokens <= 6
    assert out["error"].to_pylist()[1] == ok[1]["error"]["message"] and out["num_output_tokens"][1].as_py() == 0
    # response_format json_schema: the random model's answer is held to the schema
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    typed, _ = stage(tiny_model, _chat("j", "hi", max_tokens=40, temperature=1.0, seed=1, response_format={
        "type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}))
    answer = ChatCompletion.model_validate(typed[0]["response"]["body"]).choices[0]
    assert answer.finish_reason == "stop"
    jsonschema.validate(json.loads(answer.message.content), schema)

    plain = tmp_path / "no-template"
    shutil.copytree(tiny_model, plain)
    cfg = json.loads((plain / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(cfg))
    for f in plain.glob("chat_template.*"):
        f.unlink()
    lines, _ = stage(str(plain), _chat("c", "hi"))
    assert lines[0]["error"]["code"] == "invalid_prompt" and "no chat template" in lines[0]["error"]["message"]


@pytest.mark.ray_cluster
def test_s3_in_and_out_and_a_replaced_shard_is_redone(tmp_path, tiny_model, s3):
    """On S3 (moto on 127.0.0.1): the records and shards are single PUTs; a shard replaced
    after its commit is caught by its ETag, moved aside and generated again."""
    fs, opts = s3
    lines = _requests()[0][:12]
    (tmp_path / "requests.jsonl").write_text("\n".join(lines) + "\n")
    fs.put(str(tmp_path / "requests.jsonl"), "batchlm-in/req/requests.jsonl")
    job = _job(tiny_model, "s3://batchlm-in/req/requests.jsonl", "s3://batchlm-out/ob", storage_options=opts)
    job["input"]["storage_options"] = opts
    cfg = write_yaml(tmp_path / "job.yaml", job)
    p = cli("run", cfg)
    assert p.returncode == 0, p.stderr[-3000:]
    names = sorted(x.rsplit("/", 1)[-1] for x in fs.ls("batchlm-out/ob", refresh=True))
    assert names == ["_SUCCESS", "_manifest.json", *[f"_record-{u:06d}.json" for u in range(3)],
                     *[f"part-{u:06d}.jsonl" for u in range(3)]]
    got = [json.loads(x) for u in range(3) for x in fs.cat(f"batchlm-out/ob/part-{u:06d}.jsonl").splitlines()]
    assert len(got) == 12 and len({g["id"] for g in got}) == 12
    for g in got:
        _check_line(g)

    data = bytearray(fs.cat("batchlm-out/ob/part-000001.jsonl"))
    data[5] ^= 1
    fs.pipe("batchlm-out/ob/part-000001.jsonl", bytes(data))
    endpoint = ["--storage-option", f"endpoint_url={opts['endpoint_url']}"]
    st = cli("status", "s3://batchlm-out/ob", *endpoint)
    assert "damaged     part-000001.jsonl: ETag" in st.stdout, st.stdout + st.stderr
    p = cli("run", cfg)
    assert p.returncode == 0 and "part-000001.jsonl is damaged" in p.stderr, p.stderr[-3000:]
    redone = [json.loads(x) for x in fs.cat("batchlm-out/ob/part-000001.jsonl").splitlines()]
    assert [g["id"] for g in redone] == [g["id"] for g in got[4:8]]
    assert "complete" in cli("status", "s3://batchlm-out/ob", *endpoint).stdout
