"""`bench quality`: window/stride coverage, engine perplexity against a direct
transformers computation, configs the engine rejects, and the packaged text."""
import fnmatch
import hashlib
import json
import math
import re
import tomllib
from pathlib import Path

import pytest

from batchlm.bench import cli
from batchlm.bench import quality as q

ROOT = Path(__file__).resolve().parents[2]
KV = 64 << 20  # KV cache bytes for the tiny model: plenty, and quick to allocate


# ---- pure parts -------------------------------------------------------------------
@pytest.mark.parametrize("n,window,stride", [
    (2, 2, 1), (10, 4, 2), (1000, 64, 32), (1000, 64, 63), (1000, 64, 1), (1025, 1024, 512),
    (1536, 1024, 512), (1537, 1024, 512), (40, 1024, 512), (777, 100, 37),
])
def test_windows_score_each_token_exactly_once(n, window, stride):
    spans = q.windows(n, window, stride)
    scored = [i for s in spans for i in range(s.score_from, s.end)]
    assert scored == list(range(1, n))  # each of 1..n-1 once, in order
    assert spans[0].begin == 0 and spans[0].score_from == 1
    for s in spans:
        assert 0 <= s.begin < s.score_from < s.end <= n and s.end - s.begin <= window
        assert s.begin % stride == 0
    for s in spans[1:]:  # after the first window: at least window - stride tokens of context
        assert s.score_from - s.begin >= window - stride
    assert sum(s.num_scored for s in spans) == n - 1


def test_windows_edge_cases():
    assert q.windows(1, 8, 4) == [] and q.windows(0, 8, 4) == []
    assert q.windows(1024, 1024, 512) == [q.Span(0, 1024, 1)]
    assert q.windows(1500, 1024, 512) == [q.Span(0, 1024, 1), q.Span(512, 1500, 1024)]
    for window, stride in [(1, 1), (8, 0), (8, 8), (8, 9)]:
        with pytest.raises(ValueError):
            q.windows(100, window, stride)


def test_parse_configs():
    assert q.parse_config("float32") == {"dtype": "float32"}
    assert q.parse_config("int8") == {"quantization": "int8", "dtype": "auto"}
    assert q.parse_config("int4_g32", "bfloat16") == {"quantization": "int4_g32", "dtype": "bfloat16"}
    assert q.parse_config("bfloat16+kv_bfloat16") == {"dtype": "bfloat16", "kv_cache_dtype": "bfloat16"}
    assert q.parse_config("int8+kv_bfloat16") == {"quantization": "int8", "dtype": "auto",
                                                  "kv_cache_dtype": "bfloat16"}
    head = q.parse_config("fp8+dense_head+kv_fp8", "bfloat16")
    assert head["kv_cache_dtype"] == "fp8" and head["dtype"] == "bfloat16"
    assert (head["quantization"].method, head["quantization"].lm_head) == ("fp8", False)
    g64 = q.parse_config("int4_g64+dense_head")["quantization"]
    assert (g64.method, g64.group_size, g64.lm_head) == ("int4", 64, False)
    dense = q.parse_config("fp8+dense_head+dense_layer0+dense_layer-1", "bfloat16")["quantization"]
    assert (dense.method, dense.lm_head, dense.dense_layers) == ("fp8", False, (0, -1))
    for bad in ["", "+kv_bfloat16", "int8+bfloat16", "int8+kv_", "int8+kv_a+kv_b", "bfloat16+dense_head",
                "int8+dense_head+dense_head", "int8+dense_layer", "int8+dense_layerx", "bfloat16+dense_layer0",
                "int8+dense_layer1+dense_layer1"]:
        with pytest.raises(ValueError):
            q.parse_config(bad)
    # float32 is the reference: always first, never twice.
    assert [n for n, _ in q.parse_configs("bfloat16, int8,float32,int8")] == ["float32", "bfloat16", "int8"]
    assert [n for n, _ in q.parse_configs("int4")] == ["float32", "int4"]


def test_agreement_and_perplexity():
    same, prefix = q.agreement([[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [7, 8, 9]])
    assert same == 1 and prefix == pytest.approx((3 + 1 + 2) / 3)
    ppl, n = q.perplexity([None, math.log(0.5), math.log(0.25)])
    assert n == 2 and ppl == pytest.approx(math.sqrt(8))


def test_cli_defaults():
    args = cli.build_parser().parse_args(["bench", "quality"])
    assert args.func is cli._run_quality and args.dtype == "auto" and args.model == cli.DEFAULT_MODEL
    assert args.configs.split(",")[:3] == ["float32", "bfloat16", "int8"]
    assert (args.window, args.stride, args.text_tokens) == (1024, 512, 0)
    assert (args.num_prompts, args.max_tokens, args.prompt_len_range) == (16, 64, [100, 600])
    for extra in (["--window", "8", "--stride", "8"], ["--quantization", "int8"], ["--kv-cache-dtype", "float16"]):
        bad = cli.build_parser().parse_args(["bench", "quality", *extra])
        with pytest.raises(SystemExit):  # refused before any model is loaded
            bad.func(bad)


# ---- the packaged text ------------------------------------------------------------------
def test_text_ships_with_its_source():
    res = q.text_resource()
    assert res.is_file() and res.name == q.TEXT_NAME
    raw = res.read_bytes()
    assert len(raw) < 400_000 and raw.isascii()
    source = q.text_resource("SOURCE.md").read_text()
    # SOURCE.md names the file's sha256; the file is the one it describes.
    assert hashlib.sha256(raw).hexdigest() in re.findall(r"[0-9a-f]{64}", source)
    # pyproject's package-data puts both in the wheel.
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = data["tool"]["setuptools"]["package-data"]["batchlm.bench"]
    for name in (q.TEXT_NAME, "SOURCE.md"):
        assert any(fnmatch.fnmatch(f"data/{name}", g) for g in globs), (name, globs)


def test_text_has_20k_tokens_with_the_default_tokenizer():
    from transformers import AutoTokenizer

    from batchlm.models.resolve import resolve_model

    try:
        model_dir, _ = resolve_model(cli.DEFAULT_MODEL)
    except FileNotFoundError as e:  # the package that ships the default model is not installed
        pytest.skip(str(e))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    n = len(tok(q.load_text(), add_special_tokens=False)["input_ids"])
    assert n >= 20_000


# ---- through the engine ----------------------------------------------------------------------
def _hf_logprobs(model, ids, spans):
    """Direct transformers computation: the same windows, one forward each."""
    import torch

    out = [None] * len(ids)
    with torch.no_grad():
        for s in spans:
            logits = model(torch.tensor([ids[s.begin:s.end]])).logits[0].float()  # [w, V]
            lp = torch.log_softmax(logits, dim=-1)
            for pos in range(s.score_from, s.end):
                out[pos] = lp[pos - s.begin - 1, ids[pos]].item()
    return out


def test_engine_perplexity_matches_transformers(tiny_model_dir):
    pytest.importorskip("batchlm.engine.llm_engine")
    from transformers import AutoModelForCausalLM

    from batchlm import LLM

    llm = LLM(tiny_model_dir, dtype="float32", kv_cache_memory=KV, max_num_batched_tokens=256)
    ids = llm.get_tokenizer()(q.load_text(), add_special_tokens=False)["input_ids"][:300]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype="float32").eval()
    # Tolerance: both float32, different kernels and batching: per-token logprobs
    # within 1e-3 (absolute), perplexity within 1e-4 (relative).
    for window, stride in [(64, 32), (100, 99), (300, 299)]:
        spans = q.windows(len(ids), window, stride)
        got = q.score_tokens(llm, ids, window, stride)
        want = _hf_logprobs(model, ids, spans)
        assert got[0] is None and all(v is not None for v in got[1:])
        assert max(abs(a - b) for a, b in zip(got[1:], want[1:])) < 1e-3
        (ppl, n), (ppl_hf, n_hf) = q.perplexity(got), q.perplexity(want)
        assert n == n_hf == len(ids) - 1
        assert ppl == pytest.approx(ppl_hf, rel=1e-4)
    # One window over everything is the plain full-sequence perplexity.
    import torch

    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert q.perplexity(q.score_tokens(llm, ids, 300, 1))[0] == pytest.approx(math.exp(loss), rel=1e-4)


def test_unavailable_config_is_reported_and_the_others_run(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("batchlm.engine.llm_engine")
    out = tmp_path / "q.json"
    argv = ["bench", "quality", "--model", tiny_model_dir, "--kv-cache-memory", str(KV),
            "--configs", "no_such_quantization,bfloat16+kv_bfloat16,bfloat16", "--window", "64",
            "--stride", "32", "--text-tokens", "200", "--num-prompts", "3", "--max-tokens", "5",
            "--prompt-len-range", "100", "160", "--json", str(out)]
    args = cli.build_parser().parse_args(argv)
    args.argv = argv  # as batchlm.cli passes it
    assert args.func(args) == 0
    text = capsys.readouterr().out
    print(text)
    assert "not available:" in text and "ppl" in text and "python -m batchlm bench quality" in text
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["float32", "no_such_quantization", "bfloat16+kv_bfloat16", "bfloat16"]
    ref, bad = rows["float32"], rows["no_such_quantization"]
    assert bad["note"].startswith("not available:") and not bad["available"] and bad["ppl"] is None
    assert ref["ppl_delta_pct"] == 0 and ref["identical"] == ref["compared"] == 3
    assert ref["tokens_scored"] == 199 and ref["mean_common_prefix"] == ref["mean_output_tokens"]
    for name in ("bfloat16+kv_bfloat16", "bfloat16"):
        r = rows[name]
        assert r["available"] and r["tokens_scored"] == 199 and math.isfinite(r["ppl"])
        assert abs(r["ppl_delta_pct"]) < 5 and 0 <= r["identical"] <= r["compared"] == 3
        assert r["weight_ratio"] < 0.75  # bfloat16 weights: about half of float32's
    assert rows["bfloat16+kv_bfloat16"]["kwargs"] == {"dtype": "bfloat16", "kv_cache_dtype": "bfloat16"}
    assert rows["bfloat16+kv_bfloat16"]["engine"] == "bfloat16, kv bfloat16"
    assert ref["engine"] == "float32, kv float32"
