"""GGUF tensors, one at a time, under their Hugging Face checkpoint names.

Contract
--------
`iter_gguf_weights(path, hf_config) -> Iterator[(hf_name, tensor | GroupQuant)]`
reads the GGUF file memory-mapped (gguf.GGUFReader) and yields its tensors in
file order, one at a time, so no full-precision copy of the whole model is
ever held: only the current tensor; its file pages are dropped from RSS
(madvise) once it is converted. Peak RSS growth for the 135M Q4_1 default
model: ~160 MiB, nearly all of it GGUFReader parsing the metadata (a numpy view
per vocabulary entry), which is freed before the weights are read.
- Names: transformers' own GGUF mapping (`get_gguf_hf_weights_map` over the
  model transformers would build from `hf_config`, on the meta device), e.g.
  `blk.0.attn_q.weight -> model.layers.0.self_attn.q_proj.weight`. The name
  table is chosen by the file's `general.architecture` (a Mistral GGUF says
  "llama"), where transformers 5.x uses `config.model_type` (and fails on
  "mistral"); the table is the same. Tensors HF recomputes from the config
  (`rope_freqs`, `rope_factors_*`, `blk.N.attn_rot_embd`) are skipped; any
  other unmapped name raises ValueError naming it.
- Q/K rows: transformers' tensor processor for the architecture (Llama:
  `LlamaTensorProcessor` reverse permute) undoes llama.cpp's rotary row order;
  for a GroupQuant its row permutation is applied to codes, scale and zero.
  Architectures whose processor reshapes more than rows are refused.
- Q4_0, Q4_1, Q8_0, Q4_K, Q6_K 2-D tensors -> `GroupQuant` built directly
  from the block bytes (`tensor_to_groupquant`), whose `dequantize()` equals
  `gguf.quants.dequantize` bit for bit:
    Q4_0 bits 4, group 32, scale d, zero -8d     Q8_0 bits 8, group 32, scale d
    Q4_1 bits 4, group 32, scale d, zero m       Q6_K bits 8 (q-32), group 16, scale d*sc
    Q4_K bits 4, group 32, scale d*sc, zero -dmin*m
- Every other type (F32, F16, BF16, Q5_*, Q2_K, Q3_K, Q5_K, IQ*, ...) -> a
  float32 torch tensor from `gguf.quants.dequantize`.
Shapes are HF shapes: GGUF's ne is reversed, so a linear weight is [N out, K in].

It does not know modules, fusing, tied embeddings (a tied model's GGUF has no
`output.weight`; what is there is yielded) or dtypes beyond the above.
"""
from __future__ import annotations

import mmap
import os
import re
from typing import Iterator

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader
from gguf.quants import dequantize

from batchlm.quantization.groupquant import GroupQuant

# Tensors llama.cpp writes that transformers recomputes from the config.
_RECOMPUTED = re.compile(r"^(rope_freqs|rope_factors_long|rope_factors_short"
                         r"|blk\.\d+\.attn_rot_embd)(\.weight)?$")


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 -> [...] float32 (little-endian fp16, as gguf reads it)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., B] uint8 -> [..., 2B]: the B low nibbles, then the B high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(b, n, k):  # b: [N, K/32, 18] = d f16 | 16 bytes of nibbles
    d = _f16(b[..., 0:2])  # [N, K/32]
    codes = _nibbles(b[..., 2:]).reshape(n, k)  # [N, K] 0..15
    return 4, 32, codes, d, d * np.float32(-8)


def _q4_1(b, n, k):  # b: [N, K/32, 20] = d f16 | m f16 | 16 bytes of nibbles
    codes = _nibbles(b[..., 4:]).reshape(n, k)  # [N, K] 0..15
    return 4, 32, codes, _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _q8_0(b, n, k):  # b: [N, K/32, 34] = d f16 | 32 int8
    codes = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)  # [N, K]
    return 8, 32, codes, _f16(b[..., 0:2]), None


def _q4_k(b, n, k):  # b: [N, K/256, 144] = d f16 | dmin f16 | 12 scale bytes | 128 qs
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [N, S]
    s = b[..., 4:16].reshape(n, -1, 3, 4)  # rows: 6-bit sc low | 6-bit m low | high nibbles
    lo_d, lo_m, hi = s[..., 0, :], s[..., 1, :], s[..., 2, :]  # [N, S, 4] each
    sc = np.concatenate([lo_d & 0x3F, (hi & 0x0F) | ((lo_d >> 2) & 0x30)], -1)  # [N, S, 8]
    m = np.concatenate([lo_m & 0x3F, (hi >> 4) | ((lo_m >> 2) & 0x30)], -1)  # [N, S, 8]
    scale = (d[..., None] * sc.astype(np.float32)).reshape(n, k // 32)
    zero = -(dmin[..., None] * m.astype(np.float32)).reshape(n, k // 32)
    # 4 chunks of 32 bytes; chunk j: low nibbles = sub-block 2j, high = 2j+1
    codes = _nibbles(b[..., 16:].reshape(n, -1, 4, 32)).reshape(n, k)  # [N, K] 0..15
    return 4, 32, codes, scale, zero


def _q6_k(b, n, k):  # b: [N, K/256, 210] = 128 ql | 64 qh | 16 int8 scales | d f16
    ql = b[..., 0:128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    ql = (ql & 0x0F).reshape(n, -1, 8, 32)  # [N, S, 8, 32] (half, shift, byte)
    qh = b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    qh = (qh & 0x03).reshape(n, -1, 8, 32)  # [N, S, 8, 32] (half, shift, byte)
    codes = ((ql | (qh << 4)).astype(np.int8) - np.int8(32)).reshape(n, k)  # [N, K] -32..31
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)  # [N, S, 16]
    scale = (_f16(b[..., 208:210])[..., None] * sc).reshape(n, k // 16)
    return 8, 16, codes, scale, None


_PARSERS = {QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q8_0: _q8_0, QT.Q4_K: _q4_k, QT.Q6_K: _q6_k}
_BLOCK = {QT.Q4_0: (32, 18), QT.Q4_1: (32, 20), QT.Q8_0: (32, 34),
          QT.Q4_K: (256, 144), QT.Q6_K: (256, 210)}  # qtype -> (values, bytes) per block


def tensor_to_groupquant(raw: np.ndarray, qtype, shape) -> GroupQuant | None:
    """Block bytes of one 2-D tensor -> GroupQuant, or None if `qtype` is not
    one of Q4_0/Q4_1/Q8_0/Q4_K/Q6_K or `shape` is not 2-D.

    raw: uint8 holding N rows of K/values_per_block blocks (GGUFReader's
    `tensor.data`, shape [N, bytes per row]); shape: (N, K), the HF order."""
    qtype = QT(qtype)
    if qtype not in _PARSERS or len(shape) != 2:
        return None
    n, k = (int(x) for x in shape)
    per_block, nbytes = _BLOCK[qtype]
    if k % per_block or raw.size != n * (k // per_block) * nbytes:
        raise ValueError(f"{qtype.name} bytes of size {raw.size} do not fit shape {(n, k)}")
    blocks = np.asarray(raw).view(np.uint8).reshape(n, k // per_block, nbytes)  # view
    bits, group, codes, scale, zero = _PARSERS[qtype](blocks, n, k)
    as_t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))
    return GroupQuant(bits, group, as_t(codes), as_t(scale), as_t(zero))


def _processor(arch: str, hf_config):
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS, LlamaTensorProcessor, TensorProcessor)
    cls = TENSOR_PROCESSORS.get(arch, TensorProcessor)
    if cls not in (TensorProcessor, LlamaTensorProcessor):
        raise ValueError(f"GGUF architecture {arch!r} needs transformers' {cls.__name__}, "
                         "which batchlm does not support")
    return cls(config=hf_config.to_dict())


class _TopLevel:
    """The model as get_gguf_hf_weights_map sees it, without its submodules: that
    function rebuilds gguf's name table for every submodule (~8 s for 30 layers)
    although a *ForCausalLM maps all its parameters at the top level, submodule
    maps only adding names not mapped yet. A name this misses raises below."""

    def __init__(self, model):
        self.config, self._state = model.config, model.state_dict()

    def state_dict(self):
        return self._state

    def named_children(self):
        return ()


def _name_map(arch: str, hf_config, processor, shallow: bool = True) -> dict[str, str]:
    """GGUF tensor name -> HF name, from transformers over a meta-device model."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return get_gguf_hf_weights_map(_TopLevel(model) if shallow else model, processor,
                                   model_type=arch, num_layers=hf_config.num_hidden_layers)


def _permute_rows(gq: GroupQuant, perm: np.ndarray) -> GroupQuant:
    idx = torch.from_numpy(np.ascontiguousarray(perm, dtype=np.int64))  # [N]
    zero = None if gq.zero is None else gq.zero[idx]
    return GroupQuant(gq.bits, gq.group_size, gq.codes[idx], gq.scale[idx], zero)


def _release(reader: GGUFReader, t) -> None:
    """Drop a used tensor's file pages from this process's RSS (the page cache
    keeps them; nothing yielded points into the mapping, and a touch refaults)."""
    mm = getattr(reader.data, "_mmap", None)  # numpy.memmap's mmap object
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)


def iter_gguf_weights(path: str | os.PathLike, hf_config
                      ) -> Iterator[tuple[str, torch.Tensor | GroupQuant]]:
    reader = GGUFReader(path)  # memory-mapped, read-only
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path}: GGUF file has no general.architecture")
    arch = field.contents()
    reader.fields.clear()  # gguf keeps a numpy view per vocab entry: ~150 MB, not needed
    processor = _processor(arch, hf_config)
    names = _name_map(arch, hf_config, processor)
    for t in reader.tensors:
        hf_name = names.get(t.name)
        if hf_name is None:
            if _RECOMPUTED.match(t.name):
                continue
            raise ValueError(f"{path}: GGUF tensor {t.name!r} maps to no parameter of "
                             f"{type(hf_config).__name__} ({arch})")
        shape = tuple(int(x) for x in reversed(t.shape))  # HF order, e.g. [N, K]
        gq = tensor_to_groupquant(t.data, t.tensor_type, shape)
        if gq is not None:
            rows = np.arange(shape[0])  # [N]
            perm = processor.process(weights=rows, name=t.name).weights  # [N]
            value = gq if perm is rows else _permute_rows(gq, perm)
        else:
            try:
                w = dequantize(t.data, t.tensor_type)  # float32, HF shape
            except NotImplementedError as e:
                raise ValueError(f"{path}: GGUF tensor {t.name!r}: {e}") from e
            w = processor.process(weights=w, name=t.name).weights
            w = np.asarray(w, dtype=np.float32).reshape(shape)
            if not w.flags.writeable or not w.flags.c_contiguous:  # memmap view (F32)
                w = np.array(w, dtype=np.float32, order="C")
            value = torch.from_numpy(w)
        _release(reader, t)
        yield hf_name, value
