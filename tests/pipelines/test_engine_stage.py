"""The engine stage is fed continuously (issue 9, item 6): concurrent calls
share the actor's one engine, so the next batch's requests are in it before
the last ones of the current batch finish, and every row still gets its own
result. The read stage hands over token ids; `bench pipeline --tiny-model`'s
fast random model and its repeated input."""
from __future__ import annotations

import asyncio
import json
import time

import pyarrow.parquet as pq

from batchlm.pipelines.bench import _enough_rows, build_tiny_model
from batchlm.pipelines.config import parse_config
from batchlm.pipelines.runner import engine_stage_kwargs
from batchlm.pipelines.stages import EngineStage, PromptEncoder

from .helpers import DOCS, rendered_rows, tiny_job


def test_concurrent_calls_share_one_busy_engine(tmp_path, tiny_model):
    cfg = parse_config(tiny_job(tiny_model, str(tmp_path / "out"), input={"limit": 40},
                                sampling={"max_tokens": 8, "ignore_eos": True}))
    rows = rendered_rows(cfg)
    assert rows["__ids"].null_count == 0 and "__prompt" not in rows.column_names  # token ids, not text
    trace = tmp_path / "trace.jsonl"
    stage = EngineStage(**engine_stage_kwargs(cfg, str(trace)))
    engine = stage.llm.engine
    held, step = [], engine.step

    def recorded_step():  # the real step, with how many requests the engine held when it ran
        held.append(engine.get_num_unfinished_requests())
        return step()

    engine.step = recorded_step

    async def two_batches():
        return await asyncio.gather(stage(rows.slice(0, 20)), stage(rows.slice(20, 20)))

    first, second = asyncio.run(two_batches())
    assert max(held) == 40  # the second batch joined the first in the engine: no drain in between
    engine.step = step
    got = first.to_pydict(), second.to_pydict()
    assert got[0]["id"] + got[1]["id"] == rows["id"].to_pylist()
    assert got[0]["num_output_tokens"] + got[1]["num_output_tokens"] == [8] * 40
    assert not engine.has_unfinished_requests()
    # the trace's idle time: none between the two concurrent calls; a call after a drain counts its gap
    time.sleep(0.2)
    asyncio.run(stage(rows.slice(0, 4)))
    calls = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [c["idle"] for c in calls[:-1]] == [0.0] * (len(calls) - 1)
    assert calls[-1]["idle"] >= 0.2
    # the step clock: the first call had stepped nothing yet, the last counts every step before it
    assert calls[0]["steps"] == 0 and calls[-1]["steps"] == len(held)
    assert 0 < calls[-1]["step_cpu_s"] <= calls[-1]["step_wall_s"] * 1.05 + 0.01
    stage.engine.close()  # the engine's thread ends: the engine is this thread's to use directly
    direct = stage.llm.generate(rows["__ids"].to_pylist(), cfg.sampling.params(), use_tqdm=False)
    assert got[0]["generated_text"] + got[1]["generated_text"] == [o.outputs[0].text for o in direct]


def test_bench_tiny_model_and_repeated_input(tmp_path):
    cfg = parse_config(tiny_job("smollm2-135m-instruct", str(tmp_path / "out"),
                                input={"limit": None, "id_column": "id"}))
    d = build_tiny_model(str(tmp_path / "tiny"), cfg.model.name)
    tiny = parse_config(tiny_job(d, str(tmp_path / "out")))
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(d)
    assert (config.num_hidden_layers, config.hidden_size) == (2, 64)
    # the default model's tokenizer: the same ids for the same prompt
    base, small = PromptEncoder.for_job(cfg), PromptEncoder.for_job(tiny)
    assert small.tokens("Summarize: hello", None) == base.tokens("Summarize: hello", None)
    path = _enough_rows(cfg, 450, str(tmp_path))
    table = pq.read_table(path)
    assert table.num_rows == 450 and len(set(table["id"].to_pylist())) == 450
    assert table["text"][200].as_py().startswith("[copy 1] ")
    assert _enough_rows(cfg, 150, str(tmp_path)) == str(DOCS)  # enough already: the input itself
