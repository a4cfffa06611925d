"""batchlm's native CPU kernels (kernels/native/gemv.c via kernels/cpu_native.py): each build
variant against the PyTorch reference on fresh random inputs with the output poisoned first;
how a build fails; how the planner times and falls back."""
from __future__ import annotations

import platform
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batchlm.kernels import cpu_native
from batchlm.kernels import quant_matmul as qm

HAVE_CC = shutil.which("gcc") or shutil.which("cc")
X86 = platform.machine() in ("x86_64", "AMD64")
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# The build variants: this CPU's own (-march=native), and where the CPU runs them the AVX2 path
# (an AVX2-only EPYC's) and the plain C path (no vector unit assumed).
MARCHES = ["native"]
if X86 and {"avx2", "fma"} <= _cpu_flags():
    MARCHES.append("haswell")
if X86:
    MARCHES.append("x86-64")

# (M, N, K): a decode row, rows past one block of MB, N not a multiple of the block of 4
# channels, K not a multiple of the vector width, tiny shapes that are all tail.
SHAPES = [(1, 64, 128), (3, 130, 96), (5, 7, 13), (9, 257, 200), (1, 3, 5), (17, 64, 1000)]


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    if not HAVE_CC:
        pytest.skip("no C compiler on this machine")
    out = tmp_path_factory.mktemp("native")
    return {march: cpu_native.NativeLib(cpu_native.build(out, march=march)) for march in MARCHES}


def _case(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scale = torch.rand(n, generator=g) * 0.02 + 1e-3
    x = torch.randn(m, k, generator=g)
    return codes, scale, x


def _check_every_out_dtype(call, ref, atol, bf16_slack):
    """call(out) into an output poisoned with NaN, for each output dtype: every entry written; float32
    within rtol 1e-5 / atol of ref; bfloat16 at most one bfloat16 step (plus bf16_slack) from ref
    rounded the same way (the sums differ from F.linear's in their last float32 bits)."""
    for out_dtype in (torch.float32, torch.bfloat16):
        out = torch.full(ref.shape, float("nan"), dtype=out_dtype)
        assert call(out) is out and not torch.isnan(out).any(), out_dtype
        if out_dtype == torch.float32:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
        else:
            step = ref.abs().clamp(min=1e-30) * 2.0 ** -7
            assert ((out.float() - ref.to(torch.bfloat16).float()).abs() <= step + bf16_slack).all()


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_mm_matches_reference(libs, march, m, n, k):
    lib = libs[march]
    codes, scale, x = _case(m, n, k, seed=m * 1000 + n * 10 + k)
    ref = F.linear(x, codes.float() * scale.unsqueeze(1))  # [M, N] float32
    for x_dtype in (torch.float32, torch.bfloat16):
        xin = x.to(x_dtype)
        ref_x = F.linear(xin.float(), codes.float() * scale.unsqueeze(1))
        # float32 accumulate in another order than F.linear's
        _check_every_out_dtype(lambda out: lib.int8_mm(xin, codes, scale, out=out), ref_x,
                               atol=1e-5 * ref.abs().max().item(), bf16_slack=1e-6)
    # without `out`, the result takes x's dtype
    assert lib.int8_mm(x.to(torch.bfloat16), codes, scale).dtype == torch.bfloat16


# (M, N, K): one row; rows past one pass of 12 (MR) and N past one panel of 32 (NP), with a
# partial panel; K not a multiple of the 32-input run, and odd (a padded pair); all tail; the
# default model's q shape at a batched decode step.
GEMM_SHAPES = [(1, 32, 64), (13, 70, 96), (25, 33, 45), (7, 5, 1), (3, 3, 7), (64, 96, 576)]


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_int8_gemm_matches_reference(libs, march, m, n, k):
    """Every build: the AVX-512 BF16 panel loop where this CPU has it (-march=native here), the plain
    C loop elsewhere. x is bfloat16 (the kernel's contract); an int8 is exact in bfloat16, so the
    only difference from the float32 reference is the order of the float32 sums."""
    lib = libs[march]
    codes, scale, x = _case(m, n, k, seed=m * 1000 + n * 10 + k + 7)
    xb = x.to(torch.bfloat16)
    ref = F.linear(xb.float(), codes.float() * scale.unsqueeze(1))
    _check_every_out_dtype(lambda out: lib.int8_gemm(xb, codes, scale, out=out), ref,
                           atol=1e-5 * ref.abs().max().item(), bf16_slack=1e-6)
    assert lib.int8_gemm(xb, codes, scale).dtype == torch.bfloat16


def test_int8_gemm_rows_do_not_depend_on_the_batch(libs):
    """A row's result is the same bits alone as among 40 others (each row runs the same sums)."""
    lib = libs["native"]
    codes, scale, x = _case(40, 70, 200, seed=3)
    xb = x.to(torch.bfloat16)
    whole = lib.int8_gemm(xb, codes, scale, out=torch.empty(40, 70))
    for i in (0, 11, 12, 39):
        assert torch.equal(lib.int8_gemm(xb[i:i + 1].contiguous(), codes, scale, out=torch.empty(1, 70)),
                           whole[i:i + 1])


INT4_SHAPES = [(1, 64, 128, 32), (3, 48, 96, 32), (5, 32, 256, 128), (9, 80, 576, 64), (4, 16, 64, 64)]


def _int4_case(m, n, k, group, seed):
    from batchlm.quantization.groupquant import quantize_int4
    g = torch.Generator().manual_seed(seed)
    gq = quantize_int4(torch.randn(n, k, generator=g), group)
    return qm.pack_int4_tiles(gq.codes, gq.scale, gq.zero, group), torch.randn(m, k, generator=g)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("m,n,k,group", INT4_SHAPES)
def test_int4_mm_matches_reference(libs, march, m, n, k, group):
    """Every build: the AVX-512 BF16 loop where this CPU has it (-march=native here), the plain C
    loop elsewhere (AVX2 and x86-64 builds have no vdpbf16ps)."""
    lib = libs[march]
    w, x = _int4_case(m, n, k, group, seed=m * 100 + n + k)
    deq = qm.dequantize_int4(w)  # [N, K] float32
    for x_dtype in (torch.float32, torch.bfloat16):
        xin = x.to(x_dtype)
        # the kernel's math: activations rounded to bfloat16, float32 sums
        ref = F.linear(xin.to(torch.bfloat16).float(), deq)
        # the zero point comes back out of sums of x times (q + 128): a few float32 steps of
        # 128 * |x| * |scale| per input, ~1e-6 of the output
        _check_every_out_dtype(lambda out: lib.int4_mm(xin, w.tiles, w.scale, w.zero, group, out=out), ref,
                               atol=2e-5 * ref.abs().max().item(), bf16_slack=1e-5)


# (M, N, K, group): as INT4_SHAPES, with rows past one pass of 12 and channels past one panel of 32
# (80: two and a half 32-channel panels, the last block of 16 alone; 48: a panel and a half)
INT4_GEMM_SHAPES = [(1, 64, 128, 32), (13, 48, 96, 32), (25, 80, 576, 64), (4, 16, 256, 128)]


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("m,n,k,group", INT4_GEMM_SHAPES)
def test_int4_gemm_matches_reference(libs, march, m, n, k, group):
    """The weight rounded to bfloat16 once (the kernel's contract; the float32 dequantized
    reference rounds to the same bits here), then float32 sums of bfloat16 x: only the order of the
    sums differs from the reference. A real channel count below the tiles' (n - 3): only it is
    written (the check of every entry covers the [M, n - 3] output)."""
    lib = libs[march]
    w, x = _int4_case(m, n, k, group, seed=m * 100 + n + k + 2)
    xb = x.to(torch.bfloat16)
    deq = qm.dequantize_int4(w).to(torch.bfloat16).float()  # [N, K]
    for real in (n, n - 3):
        ref = F.linear(xb.float(), deq[:real])
        _check_every_out_dtype(lambda out: lib.int4_gemm(xb, w.tiles, w.scale, w.zero, group, real, out=out),
                               ref, atol=1e-5 * ref.abs().max().item(), bf16_slack=1e-6)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("m,n,k,group", INT4_SHAPES)
def test_int4_dequant_t_matches_reference(libs, march, m, n, k, group):
    """The weight dequantized and transposed, every entry written (over a poisoned buffer), float32
    within one rounding of the reference's (the kernel fuses scale * q + zero), bfloat16 within one
    bfloat16 step."""
    lib = libs[march]
    w, _ = _int4_case(m, n, k, group, seed=m * 100 + n + k + 1)
    ref = qm.dequantize_int4(w).t()  # [K, N] float32
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((k, n), float("nan"), dtype=dtype)
        got = lib.int4_dequant_t(w.tiles, w.scale, w.zero, group, dtype, out=out)
        assert got is out and not torch.isnan(got).any()
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=2e-7, atol=1e-6 * ref.abs().max().item())
        else:
            step = ref.abs().clamp(min=1e-30) * 2.0 ** -7
            assert ((got.float() - ref).abs() <= step + 1e-6).all()


def test_fast_loops_only_where_the_cpu_has_them(libs):
    if "x86-64" in libs:
        assert not libs["x86-64"].int4_fast and not libs["x86-64"].gemm_fast
    if "haswell" in libs:
        assert not libs["haswell"].gemm_fast
    if "native" in libs:
        assert libs["native"].int4_fast == ({"avx512_bf16", "avx512bw"} <= _cpu_flags())
        assert libs["native"].gemm_fast == ({"avx512_bf16", "avx512bw", "avx512vl"} <= _cpu_flags())


@needs_cc
def test_library_builds_here_and_is_cached(tmp_path):
    lib = cpu_native.library()
    assert lib is not None, cpu_native.unavailable_reason()
    a = cpu_native.build(tmp_path)
    mtime = a.stat().st_mtime_ns
    assert cpu_native.build(tmp_path) == a and a.stat().st_mtime_ns == mtime  # kept, not rebuilt
    if "x86-64" in MARCHES:
        assert cpu_native.build(tmp_path, march="x86-64") != a  # another variant, another key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".gemv.")]  # no half-written files


@needs_cc
def test_a_library_others_could_write_is_not_loaded(tmp_path):
    out = tmp_path / "native"
    path = cpu_native.build(out)
    assert out.stat().st_mode & 0o777 == 0o700
    path.chmod(0o666)  # e.g. planted or left group/world-writable
    with pytest.raises(RuntimeError, match="writable by other users"):
        cpu_native.build(out)
    path.chmod(0o644)
    out.chmod(0o777)
    with pytest.raises(RuntimeError, match="writable by other users"):
        cpu_native.build(out)


def test_build_failures_name_the_problem(tmp_path):
    with pytest.raises(RuntimeError, match="does not run"):
        cpu_native.build(tmp_path, compiler=str(tmp_path / "no-such-cc"))
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake cc 1.0'\n[ \"$1\" = --version ] && exit 0\necho 'error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="failed on gemv.c, gemm.c, layers.c: error: broken"):
        cpu_native.build(tmp_path / "out", compiler=str(fake))
    assert not list((tmp_path / "out").iterdir())  # the failed build left nothing behind


@pytest.fixture
def native_off(monkeypatch):
    monkeypatch.setenv("BATCHLM_NATIVE_KERNELS", "0")
    cpu_native._load.cache_clear()
    yield
    monkeypatch.delenv("BATCHLM_NATIVE_KERNELS")
    cpu_native._load.cache_clear()


def test_turned_off_means_torch_kernels_and_layouts(native_off):
    from batchlm.quantization.groupquant import quantize_int4
    gq = quantize_int4(torch.randn(64, 128), 32)
    assert isinstance(qm.pack_int4_auto(gq.codes, gq.scale, gq.zero, 32), qm.Int4Packed)
    assert not qm.available(qm.int4_native_mm, torch.device("cpu"))


def test_turned_off_means_torch_kernels_only(native_off, tmp_path):
    from batchlm.quantization import plan

    assert cpu_native.library() is None and "BATCHLM_NATIVE_KERNELS=0" in cpu_native.unavailable_reason()
    assert not qm.available(qm.int8_native_mm, torch.device("cpu"))
    assert not qm.available(qm.int8_native_gemm, torch.device("cpu"))
    assert not qm.available(qm.int4_native_gemm, torch.device("cpu"))
    assert qm.available(qm.int8_pack_mm, torch.device("cpu"))

    class Layer:  # what the planner reads of a QuantLinear
        def __init__(self):
            from batchlm.quantization.config import QuantConfig
            from batchlm.quantization.groupquant import quantize_int8
            gq = quantize_int8(torch.randn(64, 128))
            self.qcfg = QuantConfig(method="int8")
            self.out_features, self.in_features, self.group_size = 64, 128, None
            self.packed = qm.pack_int8(gq.codes, gq.scale[:, 0], torch.float32)

    layer = Layer()
    # a plan stored while the library was there, naming its kernel, is measured again, not used
    cache = tmp_path / "plans.json"
    key = "int8:64x128:gNone:float32"
    import json
    cache.write_text(json.dumps({plan.machine_key(torch.device("cpu")): {key: [[plan.UNBOUNDED, "int8_native_mm"]]}}))
    plans = plan.plan_kernels([layer], torch.float32, torch.device("cpu"), cache_file=cache)
    names = {n for _, n in plans[key]}
    assert names and "int8_native_mm" not in names
    assert all(fn is not qm.int8_native_mm for _, fn in layer.kernels)
