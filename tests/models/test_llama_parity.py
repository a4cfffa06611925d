"""batchlm's Llama-family models match transformers, token for token, through
the paged cache: a flat multi-prompt prefill, decodes, and a chunked prefill
whose second chunk attends to the first through the cache."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from batchlm.kernels.attention import TorchPagedAttention
from batchlm.models import get_model_class, load_model

from .helpers import PagedCacheSim, rel_err, tiny_hf_model

TOL = 1e-4

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

CASES = {
    "llama-tied": (LlamaConfig, dict(tie_word_embeddings=True)),
    "llama3-rope-untied": (LlamaConfig, dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "llama-linear-rope-bias": (LlamaConfig, dict(
        tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=5000.0)),
    "mistral-untied-head32": (MistralConfig, dict(tie_word_embeddings=False, head_dim=32)),
    "qwen2-tied": (Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3-untied-head32": (Qwen3Config, dict(tie_word_embeddings=False, head_dim=32)),
    "qwen3-tied": (Qwen3Config, dict(tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    config_cls, overrides = CASES[request.param]
    hf = tiny_hf_model(config_cls, seed=len(request.param), **overrides)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    loaded = load_model(str(path), torch.float32, "cpu", TorchPagedAttention())
    return hf, loaded


@torch.no_grad()
def hf_logits(hf, tokens: list[int]) -> torch.Tensor:
    return hf(torch.tensor([tokens])).logits[0].float()  # [len, vocab]


def test_class_and_dtype(pair):
    hf, loaded = pair
    assert type(loaded.module) is get_model_class(hf.config)
    assert type(loaded.module).__name__ == type(hf).__name__
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    assert loaded.tokenizer is None  # tiny test dirs ship no tokenizer


def test_prefill_decode_chunked_match_transformers(pair):
    hf, loaded = pair
    model = loaded.module
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()  # noqa: E731
    seqs = {"a": rand(5), "b": rand(9), "c": rand(3), "d": rand(11)}
    cache = PagedCacheSim(hf.config, block_size=4)
    produced: dict[str, list[tuple[int, torch.Tensor]]] = {s: [] for s in seqs}

    def run(chunks, num_decodes):
        ids, pos, meta = cache.step(chunks, num_decodes)
        hidden = model(ids, pos, cache.kv_caches, meta)  # [T, hidden]
        assert hidden.shape == (len(ids), hf.config.hidden_size)
        logits = model.compute_logits(hidden)  # [T, vocab]
        assert logits.dtype == torch.float32
        for row, p in enumerate(pos.tolist()):
            seq_id = next(s for s, (lo, hi) in spans(chunks) if lo <= row < hi)
            produced[seq_id].append((p, logits[row]))

    # Step 1: three whole prompts plus the first chunk (6 tokens) of "d", one flat batch.
    run([("a", seqs["a"]), ("b", seqs["b"]), ("c", seqs["c"]), ("d", seqs["d"][:6])], 0)
    # Step 2: decodes of a, b, c first, then the second chunk of "d" (reads chunk 1 from cache).
    for s in "abc":
        seqs[s].append(rand(1)[0])
    run([(s, seqs[s][-1:]) for s in "abc"] + [("d", seqs["d"][6:])], 3)
    # Steps 3-4: everyone decodes.
    for _ in range(2):
        for s in "abcd":
            seqs[s].append(rand(1)[0])
        run([(s, seqs[s][-1:]) for s in "abcd"], 4)

    for s, tokens in seqs.items():
        ref = hf_logits(hf, tokens)
        got = dict(produced[s])
        assert sorted(got) == list(range(len(tokens))), s
        ours = torch.stack([got[p] for p in range(len(tokens))])
        assert rel_err(ours, ref) < TOL, (s, rel_err(ours, ref))


def spans(chunks):
    start = 0
    for seq_id, tokens in chunks:
        yield seq_id, (start, start + len(tokens))
        start += len(tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_rms_norm_is_bitwise_transformers(dtype, rows):
    # The norm runs 2 x layers + 1 times a step with its own op sequence
    # (sum / dim for the mean, one rounding on store below float32): it must
    # stay bitwise equal to transformers' LlamaRMSNorm in every dtype.
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from batchlm.models.llama import RMSNorm

    g = torch.Generator().manual_seed(rows)
    ours, theirs = RMSNorm(576, 1e-5), LlamaRMSNorm(576, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(576, generator=g) * 0.3 + 1)
        ours.weight.copy_(theirs.weight)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    with torch.inference_mode():
        for scale in (1e-3, 1.0, 40.0):
            x = (torch.randn(rows, 576, generator=g) * scale).to(dtype)
            assert torch.equal(ours(x), theirs(x)), (dtype, rows, scale)
