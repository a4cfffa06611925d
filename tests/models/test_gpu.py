"""The same parity on a CUDA device (skipped without one)."""
from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config

from batchlm.kernels.attention import TorchPagedAttention
from batchlm.models import load_model

from .helpers import PagedCacheSim, rel_err, tiny_hf_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_cuda_prefill_and_decode_match_cpu_transformers(tmp_path):
    hf = tiny_hf_model(Qwen3Config, tie_word_embeddings=False, head_dim=32)
    hf.save_pretrained(tmp_path)
    dev = torch.device("cuda")
    loaded = load_model(str(tmp_path), torch.float32, dev, TorchPagedAttention())
    assert all(p.device.type == "cuda" for p in loaded.module.parameters())
    cache = PagedCacheSim(hf.config)
    cache.kv_caches = [(k.to(dev), v.to(dev)) for k, v in cache.kv_caches]
    tokens = [7, 3, 9, 11, 2, 5]
    rows = []
    for chunk, nd in ((tokens[:5], 0), (tokens[5:], 1)):
        ids, pos, meta = cache.step([("s", chunk)], nd)
        meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc = (
            t.to(dev) for t in (meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc))
        hidden = loaded.module(ids.to(dev), pos.to(dev), cache.kv_caches, meta)
        rows.append(loaded.module.compute_logits(hidden).cpu())
    with torch.no_grad():
        ref = hf(torch.tensor([tokens])).logits[0]
    # TF32 matmuls may be on; keep a looser bound than on the CPU.
    assert rel_err(torch.cat(rows), ref) < 1e-2
