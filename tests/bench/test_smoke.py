"""End to end: `bench throughput` and `bench classify` on a tiny random model dir.

Never asserts on speed: only that the commands run and report what they should.
"""
import json

import pytest

from batchlm.bench import cli

pytest.importorskip("batchlm.engine.llm_engine")


def _run(argv):
    args = cli.build_parser().parse_args(argv)
    return args.func(args)


def test_throughput_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = _run(["bench", "throughput", "--model", tiny_model_dir, "--num-prompts", "4",
               "--prompt-len-range", "100", "160", "--max-tokens", "6", "--baseline", "hf",
               "--hf-batch-sizes", "2,4", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "batchlm" in text and "hf generate bs=2" in text and "output tokens/s" in text
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    assert names == ["batchlm", "hf generate bs=2", "hf generate bs=4"]
    assert all(r["requests"] == 4 and 4 <= r["output_tokens"] <= 24 for r in data["rows"])
    assert data["hf"]["compared"] == 4 and 0 <= data["hf"]["identical"] <= 4
    assert data["ratio_output_tokens_per_s"] > 0 and data["matmul_gflops"] > 0


def test_classify_end_to_end(tiny_model_dir, tmp_path):
    out = tmp_path / "c.json"
    assert _run(["bench", "classify", "--model", tiny_model_dir, "--num-rows", "3", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == 3 and data["speedup"] > 0 and data["instruction_tokens"] > 200


def test_throughput_quantized_with_a_same_process_comparison(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "q.json"
    rc = _run(["bench", "throughput", "--model", tiny_model_dir, "--num-prompts", "3",
               "--prompt-len-range", "100", "140", "--max-tokens", "4", "--quantization", "int8",
               "--compare", "float32", "--compare", "int4_g32+kv_bfloat16", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "batchlm / batchlm float32 output tokens/s (same process, same workload)" in text
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["batchlm", "batchlm float32", "batchlm int4_g32+kv_bfloat16"]
    notes = [r["note"] for r in data["rows"]]
    assert "int8 weights" in notes[0] and notes[1].startswith("float32,") and "kv bfloat16" in notes[2]
    assert set(data["compare"]) == {"float32", "int4_g32+kv_bfloat16"}
    assert data["quantization"] == "int8" and data["run_dtype"] in ("float32", "bfloat16")


def test_throughput_with_and_without_speculation(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "s.json"
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 2}'
    rc = _run(["bench", "throughput", "--model", tiny_model_dir, "--num-prompts", "3", "--dtype", "float32",
               "--prompt-len-range", "100", "140", "--max-tokens", "8", "--speculative-config", spec,
               "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "batchlm speculative / batchlm output tokens/s (same process, same workload)" in text
    assert "mean acceptance length" in text
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == ["batchlm", "batchlm speculative"]
    sp = data["speculative"]
    assert sp["compared"] == 3 and sp["identical"] == 3  # fp32 greedy: speculation changes nothing
    assert sp["proposed"] >= sp["accepted"] >= 0 and sp["ratio_output_tokens_per_s"] > 0
    with pytest.raises(SystemExit, match="speculative_config.num_speculative_tokens"):
        _run(["bench", "throughput", "--model", tiny_model_dir, "--speculative-config",
              '{"method": "ngram", "num_speculative_tokens": 0}'])
