"""Classification scores the rendered prompt's own token ids (issue 9, item 3).

A tiny random Llama whose tokenizer adds a BOS token (as Llama 3 and Mistral
tokenizers do): the engine stage must hand the engine exactly one BOS, and
the label probabilities must be those of `LLM.classify` on the same ids, in
process and through `batchlm run`.
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from batchlm import LLM
from batchlm.pipelines.config import parse_config
from batchlm.pipelines.runner import engine_stage_kwargs, run_job
from batchlm.pipelines.stages import EngineStage, output_columns
from tests.engine.helpers import BOS, bos_tokenizer, tiny_model_dir

from .helpers import read_output, rendered_rows, run_engine_stage, tiny_job

TEXTS = ["a fine film", "dull and long", "I laughed a lot, then cried", "meh", "best of the year", "no"]
LABELS = ["good", "bad"]


@pytest.fixture(scope="module")
def bos_model(tmp_path_factory) -> str:
    d, _ = tiny_model_dir(tmp_path_factory.mktemp("bos-llama"), LlamaConfig, tokenizer=bos_tokenizer(),
                          bos_token_id=BOS)
    return d


def _job(tmp_path, model: str, chat: bool) -> dict:
    data = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"text": TEXTS}), data)
    return parse_config(tiny_job(
        model, str(tmp_path / "out"), input={"path": str(data), "limit": None},
        task={"type": "classify", "prompt": "Review: {{ text }}", "labels": LABELS, "chat_template": chat},
        model={"dtype": "float32"}, resources={"batch_size": 64}, output={"carry": [], "rows_per_shard": 50}))


def _expected_ids(model: str, chat: bool) -> list[list[int]]:
    """The prompts' ids built by hand: one BOS, then the text's own tokens."""
    tok = AutoTokenizer.from_pretrained(model)
    assert tok("x")["input_ids"][0] == BOS  # the saved tokenizer really adds a BOS
    texts = [f"<user>Review: {t}\n<assistant>" if chat else f"Review: {t}" for t in TEXTS]
    return [[BOS] + tok.encode(t, add_special_tokens=False) for t in texts]


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain"])
def test_engine_stage_scores_the_rendered_ids_with_one_bos(tmp_path, bos_model, chat):
    cfg = _job(tmp_path, bos_model, chat)
    stage = EngineStage(**engine_stage_kwargs(cfg))
    seen = []
    score = stage.llm.engine.add_score_request

    def record(request_id, prompt_token_ids, continuations):  # the real engine call, recorded
        seen.append(list(prompt_token_ids))
        return score(request_id, prompt_token_ids, continuations)

    stage.llm.engine.add_score_request = record
    out = run_engine_stage(stage, rendered_rows(cfg))
    expected = _expected_ids(bos_model, chat)
    assert seen == expected
    assert all(ids.count(BOS) == 1 for ids in seen)
    assert out.column_names[-len(output_columns("classify")):] == output_columns("classify")
    assert out["error"].null_count == len(TEXTS)
    assert out["num_input_tokens"].to_pylist() == [len(ids) for ids in expected]
    stage.engine.close()  # the engine's thread ends: the engine is this thread's to use directly
    stage.llm.engine.add_score_request = score
    stage.llm.reset_prefix_cache()
    direct = stage.llm.classify(expected, LABELS, use_tqdm=False)
    assert out["label_probs"].to_pylist() == [dict(zip(LABELS, r.probs)) for r in direct]
    assert out["label"].to_pylist() == [r.label for r in direct]


@pytest.mark.ray_cluster
def test_classify_through_batchlm_run_matches_llm_classify_on_the_same_ids(tmp_path, bos_model, local_ray):
    cfg = _job(tmp_path, bos_model, chat=True)
    result = run_job(cfg, stream=io.StringIO())
    assert result.complete and result.errors == 0
    table = read_output(cfg.output.path)
    expected = _expected_ids(bos_model, chat=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine actor (cpus_per_replica: 1)
    try:
        direct = LLM(**cfg.model.engine_kwargs()).classify(expected, LABELS, use_tqdm=False)
    finally:
        torch.set_num_threads(threads)
    assert table["id"].to_pylist() == [f"reviews.parquet#{i}" for i in range(len(TEXTS))]
    assert table["num_input_tokens"].to_pylist() == [len(ids) for ids in expected]
    assert table["label_probs"].to_pylist() == [dict(zip(LABELS, r.probs)) for r in direct]
    assert table["label"].to_pylist() == [r.label for r in direct]
