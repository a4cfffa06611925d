"""load_model's resolution and refusals, the registry, kv_cache_shape."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config

from batchlm.kernels.attention import TorchPagedAttention
from batchlm.models import get_model_class, kv_cache_shape, load_model
from batchlm.models.llama import LlamaForCausalLM, Qwen3ForCausalLM

from .helpers import PagedCacheSim, rel_err, tiny_hf_model


def prefill_logits(module, config, tokens):
    cache = PagedCacheSim(config)
    ids, pos, meta = cache.step([("s", tokens)], 0)
    return module.compute_logits(module(ids, pos, cache.kv_caches, meta))


def test_sharded_safetensors(tmp_path):
    hf = tiny_hf_model(LlamaConfig, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded = load_model(str(tmp_path), torch.float32, torch.device("cpu"), TorchPagedAttention())
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    assert rel_err(prefill_logits(loaded.module, hf.config, tokens), ref) < 1e-4


def test_dtype_auto_and_bf16(tmp_path):
    hf = tiny_hf_model(LlamaConfig, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    auto = load_model(str(tmp_path), "auto", "cpu", TorchPagedAttention())
    assert auto.dtype == torch.float32
    bf16 = load_model(str(tmp_path), torch.bfloat16, "cpu", TorchPagedAttention())
    assert all(p.dtype == torch.bfloat16 for p in bf16.module.parameters())
    logits = prefill_logits(bf16.module, hf.config, [1, 2, 3])
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_pickle_only_dir_refused(tmp_path):
    hf = tiny_hf_model(LlamaConfig)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle weights are not supported, convert to safetensors"):
        load_model(str(tmp_path), torch.float32, "cpu", TorchPagedAttention())


def test_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(str(missing), torch.float32, "cpu", TorchPagedAttention())
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(str(tmp_path / "nope.gguf"), torch.float32, "cpu", TorchPagedAttention())


def test_bad_gguf_and_empty_dir(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        load_model(str(bad), torch.float32, "cpu", TorchPagedAttention())
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_model(str(empty), torch.float32, "cpu", TorchPagedAttention())


def test_unknown_architecture(tmp_path):
    hf = tiny_hf_model(LlamaConfig)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architectures"] = ["FancyNewForCausalLM"]
    cfg["model_type"] = "llama"  # keep AutoConfig happy; the fallback must not hide the name
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # architectures[0] unknown but model_type known: falls back to model_type.
    assert get_model_class(LlamaConfig.from_pretrained(tmp_path)) is LlamaForCausalLM
    with pytest.raises(ValueError) as e:
        get_model_class("FancyNewForCausalLM")
    msg = str(e.value)
    assert "FancyNewForCausalLM" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg


def test_unsupported_model_through_load_model(tmp_path):
    from safetensors.torch import save_file
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    save_file({"wte.weight": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supports: LlamaForCausalLM"):
        load_model(str(tmp_path), torch.float32, "cpu", TorchPagedAttention())


def test_registry_by_model_type_and_kv_cache_shape():
    cfg = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      num_hidden_layers=3)
    assert get_model_class(cfg) is Qwen3ForCausalLM
    assert kv_cache_shape(cfg) == (3, 2, 32)
    assert kv_cache_shape(LlamaConfig(hidden_size=64, num_attention_heads=4,
                                      num_hidden_layers=2)) == (2, 4, 16)


def test_corrupt_safetensors_and_tied_copy_of_lm_head(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_model(LlamaConfig, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    # A tied checkpoint that stores lm_head.weight anyway still loads.
    state = load_file(str(tmp_path / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    load_model(str(tmp_path), torch.float32, "cpu", TorchPagedAttention())
    # A truncated file is a ValueError naming it.
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(str(tmp_path), torch.float32, "cpu", TorchPagedAttention())


def test_missing_weight_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = tiny_hf_model(LlamaConfig, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing weights: model.layers.1.self_attn.qkv_proj"):
        load_model(str(tmp_path), torch.float32, "cpu", TorchPagedAttention())
