"""Quantized matmul kernels against their PyTorch reference (dequantize, then
F.linear in float32), on fresh random inputs; the packing round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchlm.kernels import quant_matmul as qm
from batchlm.quantization.groupquant import quantize_int4, quantize_int8

# Tolerances, relative to the reference output's largest magnitude:
# - kernels that compute in the activations' dtype: float32 1e-5; bfloat16 2e-2
#   (8-bit mantissa activations, outputs and int4 scales);
# - the packed CPU kernels always take bfloat16 activations: 2e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _case(n, k, m, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g).to(dtype)
    return w, x


@pytest.mark.parametrize("n,k,group", [(96, 128, 32), (192, 256, 64), (64, 256, 128), (130, 64, 32)])
def test_int4_layout_round_trip_and_rows(n, k, group):
    w, _ = _case(n, k, 1, torch.float32, n + k)
    gq = quantize_int4(w, group)
    p = qm.pack_int4(gq.codes, gq.scale, gq.zero, group)
    assert p.packed.shape[0] % qm.INT4_TILE_N == 0 and p.n == n
    assert torch.equal(qm.unpack_int4_codes(p.packed, k)[:n], gq.codes)
    ref = qm.dequantize_int4(p)
    # bf16 scale/zero storage: within 1% of the weight range of the GroupQuant
    assert (ref - gq.dequantize()).abs().max() <= 0.01 * w.abs().max()
    rows = torch.tensor([0, n - 1, n // 2, min(33, n - 1)])
    assert torch.equal(qm.int4_rows(p, rows, torch.float32), ref[rows])


@pytest.mark.parametrize("n,k,group", [(96, 128, 32), (192, 576, 64), (64, 256, 128), (130, 64, 32)])
def test_int4_tiles_round_trip_and_rows(n, k, group):
    w, _ = _case(n, k, 1, torch.float32, n + k)
    gq = quantize_int4(w, group)
    p = qm.pack_int4_tiles(gq.codes, gq.scale, gq.zero, group)
    assert p.tiles.shape == (-(-n // qm.TILE_N), k // qm.TILE_K, 64) and p.n == n
    assert torch.equal(qm.unpack_int4_tiles(p)[:n], gq.codes)
    ref = qm.dequantize_int4(p)
    assert (ref - gq.dequantize()).abs().max() <= 0.01 * w.abs().max()  # bf16 scale/zero, as Int4Packed
    rows = torch.tensor([0, n - 1, n // 2, min(17, n - 1)])
    assert torch.equal(qm.int4_rows(p, rows, torch.float32), ref[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("n,k,group", [(96, 128, 32), (192, 256, 64), (130, 256, 128)])
def test_int4_kernels_match_reference(dtype, m, n, k, group):
    w, x = _case(n, k, m, dtype, m * 7 + n)
    gq = quantize_int4(w, group)
    p = qm.pack_int4(gq.codes, gq.scale, gq.zero, group)
    ref = F.linear(x.float(), qm.dequantize_int4(p))
    for kernel, tol in ((qm.int4_dequant_mm, TOL[dtype]), (qm.int4_pack_mm, TOL[torch.bfloat16])):
        out = kernel(x, p)
        assert out.dtype == dtype and out.shape == (m, n)
        assert _rel(out, ref) < tol, kernel.__name__
    t = qm.pack_int4_tiles(gq.codes, gq.scale, gq.zero, group)
    ref_t = F.linear(x.float(), qm.dequantize_int4(t))
    kernels = [(qm.int4_dequant_mm, TOL[dtype])]
    if qm.available(qm.int4_native_mm, torch.device("cpu"), t):  # tests/kernels/test_cpu_native.py says why not
        kernels.append((qm.int4_native_mm, TOL[torch.bfloat16]))
        kernels.append((qm.int4_native_dequant_mm, TOL[dtype]))
    if qm.available(qm.int4_native_gemm, torch.device("cpu"), t, dtype):  # bf16 models, AVX-512 BF16 CPUs
        kernels.append((qm.int4_native_gemm, TOL[dtype]))
    assert not qm.available(qm.int4_native_gemm, torch.device("cpu"), t, torch.float32)
    for kernel, tol in kernels:
        out = kernel(x, t)
        assert out.dtype == dtype and out.shape == (m, n)
        assert _rel(out, ref_t) < tol, kernel.__name__
    assert not qm.available(qm.int4_pack_mm, torch.device("cpu"), t)  # each kernel reads its own layout
    assert not qm.available(qm.int4_native_mm, torch.device("cpu"), p)
    assert not qm.available(qm.int4_native_dequant_mm, torch.device("cpu"), p)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 70])
@pytest.mark.parametrize("n,k", [(96, 128), (130, 256)])
def test_int8_kernels_match_reference(dtype, m, n, k):
    w, x = _case(n, k, m, dtype, m * 3 + k)
    gq = quantize_int8(w)
    p = qm.pack_int8(gq.codes, gq.scale[:, 0], dtype)
    ref = F.linear(x.float(), qm.dequantize_int8(p))
    kernels = [(qm.int8_dequant_mm, TOL[dtype]), (qm.int8_dequant_scaled_mm, TOL[dtype]),
               (qm.int8_pack_mm, TOL[torch.bfloat16])]
    if qm.available(qm.int8_native_mm, torch.device("cpu")):  # tests/kernels/test_cpu_native.py says why not
        kernels.append((qm.int8_native_mm, TOL[dtype]))
    if qm.available(qm.int8_native_gemm, torch.device("cpu"), p, dtype):  # bf16 models, AVX-512 BF16 CPUs
        kernels.append((qm.int8_native_gemm, TOL[dtype]))
    # it takes x in bfloat16, so it is offered to bf16 models only (a float32 model's activations
    # are not rounded behind its back)
    assert not qm.available(qm.int8_native_gemm, torch.device("cpu"), p, torch.float32)
    for kernel, tol in kernels:
        out = kernel(x, p)
        assert out.dtype == dtype and out.shape == (m, n)
        assert _rel(out, ref) < tol, kernel.__name__
    # dynamic: exact integer products, so it matches its own float32 statement
    # of the math (activations rounded per row) to float rounding ...
    dyn = qm.int8_dynamic_mm(x, p)
    assert _rel(dyn, qm.int8_dynamic_reference(x, p)) < TOL[dtype]
    # ... and the weight-only reference within the cost of 8-bit activations.
    assert _rel(dyn, ref) < 3e-2


def test_int8_dynamic_rows_do_not_depend_on_the_batch():
    w, x = _case(96, 128, 6, torch.float32, 5)
    gq = quantize_int8(w)
    p = qm.pack_int8(gq.codes, gq.scale[:, 0], torch.float32)
    x[3] *= 1000.0  # an outlier row must not change the others' rounding
    whole = qm.int8_dynamic_mm(x, p)
    for i in range(6):
        assert torch.equal(qm.int8_dynamic_mm(x[i:i + 1], p), whole[i:i + 1])


def test_quantizers_error_bounds():
    w, _ = _case(64, 256, 1, torch.float32, 9)
    q8 = quantize_int8(w)
    assert ((q8.dequantize() - w).abs() <= q8.scale / 2 + 1e-6).all()
    q4 = quantize_int4(w, 64)
    step = q4.scale.repeat_interleave(64, dim=1)
    assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-5).all()
    assert int(q4.codes.max()) <= 15 and q4.codes.dtype == torch.uint8
