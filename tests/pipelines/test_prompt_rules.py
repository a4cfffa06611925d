"""One source of truth for the prompt rules (issue 9, item 4): the engine, the
job's stages and `validate` decide the same rows are too long or empty, with
the same message, and take the same max_model_len default
(batchlm/prompts.py)."""
from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import LlamaConfig

from batchlm import LLM, SamplingParams
from batchlm.pipelines.config import parse_config
from batchlm.pipelines.runner import engine_stage_kwargs
from batchlm.pipelines.stages import EngineStage, output_columns, output_schema
from batchlm.pipelines.validate import validate
from batchlm.prompts import (EMPTY_PROMPT, MAX_MODEL_LEN_CAP, default_max_model_len, keep_last, prompt_error,
                             room_after_prompt)
from tests.engine.helpers import tiny_model_dir

from .helpers import rendered_rows, run_engine_stage, tiny_job

MAX_LEN = 40
# Byte tokenizer, no chat template: a prompt of n letters is n tokens. Around the limit on purpose.
LENGTHS = [0, 30, 37, 38, 39, 40, 41, 55]


def test_prompt_rules():
    assert prompt_error(0, 10) == EMPTY_PROMPT
    assert prompt_error(10, 10) is None
    assert prompt_error(11, 10) == "the prompt has 11 tokens, more than max_model_len=10"
    assert prompt_error(9, 10, continuation=2) == "the prompt has 9 tokens plus 2 label tokens, more than max_model_len=10"
    assert prompt_error(8, 10, continuation=2) is None
    assert prompt_error(11, 10, remedy="truncate it") == "the prompt has 11 tokens, more than max_model_len=10; truncate it"
    assert room_after_prompt(None) == 1 and room_after_prompt(7) == 7 and room_after_prompt(7, [[1], [2, 3]]) == 2
    assert keep_last(10, 4) == 6 and keep_last(10, 20) == 1

    class Long:
        max_position_embeddings = 100_000

    class Short:
        max_position_embeddings = 512

    assert default_max_model_len(Long()) == MAX_MODEL_LEN_CAP == 8192
    assert default_max_model_len(Short()) == 512 and default_max_model_len(object()) == 8192
    assert default_max_model_len(Long(), 300) == 300


def test_output_columns_and_schema_are_one_list():
    assert output_schema("generate", None).names == output_columns("generate")
    assert output_schema("classify", ["a", "b"]).names == output_columns("classify")
    assert output_columns("classify")[-3:] == ["label", "label_probs", "error"]


def _job(tmp_path, model: str, task: dict) -> dict:
    data = tmp_path / "lengths.parquet"
    pq.write_table(pa.table({"text": ["a" * n for n in LENGTHS]}), data)
    return parse_config(tiny_job(model, str(tmp_path / "out"), input={"path": str(data), "limit": None},
                                 task={"prompt": "{{ text }}", "chat_template": False, **task},
                                 model={"max_model_len": MAX_LEN, "dtype": "float32"}, output={"carry": []}))


def _base(message: str | None) -> str | None:
    """A length error without the caller's remedy (the engine's and the job's differ)."""
    return message.split(";")[0] if message else None


@pytest.mark.parametrize("task, too_long", [
    ({}, [41, 55]),  # generate: generation stops at the limit, so the prompt alone must fit
    ({"type": "classify", "labels": ["ab", "cd"]}, [39, 40, 41, 55]),  # the 2-token label must fit after it
    ({"type": "classify", "labels": ["ab", "cd"], "on_long_prompt": "truncate"}, [39, 40, 41, 55]),
], ids=["generate", "classify", "classify-truncate"])
def test_validate_the_run_and_the_engine_agree_on_every_row(tmp_path, tiny_model, task, too_long):
    cfg = _job(tmp_path, tiny_model, task)
    truncate = task.get("on_long_prompt") == "truncate"
    # validate: the count it reports
    report = validate(cfg, sample=100, estimate=False)
    action = "truncated" if truncate else "recorded as errors"
    assert f"{len(too_long)} of {len(LENGTHS)} sampled rows exceed max_model_len {MAX_LEN} ({action})" in report
    # the run's stages, in process: which rows fail, and why
    stage = EngineStage(**engine_stage_kwargs(cfg))
    out = run_engine_stage(stage, rendered_rows(cfg)).to_pydict()
    stage.engine.close()  # the engine's thread ends: the engine is this thread's to use directly
    errors = dict(zip(LENGTHS, out["error"]))
    # the engine itself, on the same ids
    ids = [[65] * n for n in LENGTHS]  # 65: any byte token; the rules look at lengths only
    if cfg.task.type == "classify":
        engine = [r.error for r in stage.llm.classify(ids, ["ab", "cd"], use_tqdm=False)]
    else:
        engine = [r.error for r in stage.llm.generate(ids, SamplingParams(max_tokens=2), use_tqdm=False)]
    for n, engine_error in zip(LENGTHS, engine):
        expected = EMPTY_PROMPT if n == 0 else (
            prompt_error(n, MAX_LEN, 2 if cfg.task.type == "classify" else 0) if n in too_long else None)
        assert _base(engine_error) == expected, n
        if truncate and n in too_long:
            assert errors[n] is None, n  # kept its last tokens, with room for the label
        else:
            assert _base(errors[n]) == expected, n
    if truncate:
        kept = {n: k for n, k in zip(LENGTHS, out["num_input_tokens"])}
        assert all(kept[n] == keep_last(MAX_LEN, 2) for n in too_long)
    else:
        assert all("task.on_long_prompt: truncate" in errors[n] for n in too_long)


def test_validate_and_the_engine_take_the_same_max_model_len_default(tmp_path):
    for positions, expected in ((10_000, 8192), (300, 300)):
        d, _ = tiny_model_dir(tmp_path / f"m{positions}", LlamaConfig, max_position_embeddings=positions)
        cfg = parse_config(tiny_job(d, str(tmp_path / "out"), model={"max_model_len": None}))
        report = validate(cfg, sample=2, estimate=False)
        assert re.search(rf"max_model_len {expected}\)", report), report
        assert LLM(model=d, kv_cache_memory=1 << 24).max_model_len == expected
