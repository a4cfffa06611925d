"""Native CPU kernels (kernels/native/*.c), built with the machine's C compiler at first use.

Contract
--------
`library() -> NativeLib | None`: the kernels of kernels/native/*.c, compiled
for this CPU (`-march=native`, OpenMP) into `<cache>/native/<key>.so` and
loaded with ctypes; None where they cannot be built (no compiler, a failed
build, BATCHLM_NATIVE_KERNELS=0), with the reason in `unavailable_reason()`
and logged once. The key hashes the source, the flags, the compiler's
version and this CPU's model and feature flags, so a cache shared between
machines (a home directory on NFS) never hands a CPU code built for another.
The build writes a temporary file and renames it, so processes building at
once (Ray actors) each load a whole library. A library is code: the folder is
made private (0700) and a folder or file that another user owns or could
write is refused, not loaded.

`NativeLib.int8_mm(x [M, K], codes int8 [N, K], scale float32 [N]) -> [M, N]`
computes `x @ (codes * scale[:, None]).T` in float32, x and the result in
float32 or bfloat16 (a GEMV for a few rows); `NativeLib.int8_gemm` the same
for many rows of bfloat16 x, and `int4_gemm` for int4 tiles (gemm.c:
`gemm_fast` says whether this build has their AVX-512 BF16 loops); `NativeLib.int4_mm(x, tiles, scale, zero, group_size)`
the same for 4-bit codes in gemv.c's tile layout (`int4_fast`: whether this
build has the AVX-512 BF16 loop; without it the plain C loop is correct but
slow, and callers keep torch's own int4 kernel), and `int4_dequant_t` that
weight dequantized and transposed ([K, N], for matmuls of many rows); the
kernels' own contracts are in gemv.c. Callers (kernels/quant_matmul.py) own dtypes and packing; this
module knows nothing of models.

NOTE: the library links the OpenMP runtime by its soname (libgomp.so.1), the
one torch's CPU wheel already loaded into the process, so both share one
thread pool; the thread count is torch's, passed on every call.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NATIVE_DIR = Path(__file__).with_name("native")
SOURCES = (NATIVE_DIR / "gemv.c", NATIVE_DIR / "gemm.c", NATIVE_DIR / "layers.c")  # compiled together into one library
HEADERS = (NATIVE_DIR / "common.h",)
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write
CFLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")


def cache_root() -> Path:
    """batchlm's cache folder: $BATCHLM_CACHE_DIR or ~/.cache/batchlm."""
    env = os.environ.get("BATCHLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batchlm"


class NativeLib:
    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        P, I, L, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
        self._int8_mm = _bind(lib.bl_int8_mm, [P, I, P, P, P, I, I, I, I, I])
        self._int4_mm = _bind(lib.bl_int4_mm, [P, I, P, P, P, P, I, I, I, I, I, I])
        self._int4_dequant_t = _bind(lib.bl_int4_dequant_t, [P, P, P, P, I, I, I, I, I])
        self.int4_fast = bool(lib.bl_int4_fast())  # the AVX-512 BF16 loop, not the plain C one
        self._int8_gemm = _bind(lib.bl_int8_gemm, [P, P, P, P, I, I, I, I, I], ctypes.c_int)
        self._int4_gemm = _bind(lib.bl_int4_gemm, [P, P, P, P, P, I, I, I, I, I, I], ctypes.c_int)
        self.gemm_fast = bool(lib.bl_gemm_fast())  # gemm.c's AVX-512 BF16 loops, not the plain C ones
        self._paged_attention = _bind(lib.bl_paged_attention, [P, I, L, P, L, P, L, P, P, P, I, L, I, P, L, P,
                                                               P, P, I, I, I, I, I, F, I, I])
        self._add_rms_norm = _bind(lib.bl_add_rms_norm, [P, L, P, L, P, P, L, I, I, I, F, I])
        self._rotary = _bind(lib.bl_rotary, [P, L, P, P, P, P, I, I, I, I, I, I])
        self._silu_mul = _bind(lib.bl_silu_mul, [P, L, P, I, I, I, I])

    def int8_mm(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] float32 or bfloat16 -> [M, N] in x's dtype, or into `out` (float32 or bfloat16).
        codes int8 [N, K] and scale float32 [N], both contiguous (as quant_matmul.pack_int8 makes
        them; not checked here: this is the decode step's hot path, ~1.5 us of ctypes a call)."""
        m, k = x.shape
        if x.dtype not in DTYPES or not x.is_contiguous():
            x = x.float().contiguous()
        out = _output(out, m, codes.shape[0], x.dtype)
        self._int8_mm(x.data_ptr(), x.dtype is torch.bfloat16, codes.data_ptr(), scale.data_ptr(),
                      out.data_ptr(), out.dtype is torch.bfloat16, m, codes.shape[0], k,
                      torch.get_num_threads())
        return out

    def int8_gemm(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """gemm.c's bl_int8_gemm: x [M, K] bfloat16 -> [M, N] bfloat16, or into `out` (float32 or
        bfloat16). codes int8 [N, K] and scale float32 [N] contiguous (not checked: hot path).
        For many rows; where `gemm_fast` is False it is the plain C loop (slow)."""
        x, out = _gemm_args(x, codes.shape[0], out)
        rc = self._int8_gemm(x.data_ptr(), codes.data_ptr(), scale.data_ptr(), out.data_ptr(),
                             out.dtype is torch.bfloat16, x.shape[0], codes.shape[0], x.shape[1],
                             torch.get_num_threads())
        return _gemm_done(rc, out)

    def int4_gemm(self, x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  group_size: int, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """gemm.c's bl_int4_gemm: x [M, K] bfloat16 -> [M, n] (the first n channels of the tiles)
        bfloat16, or into `out`; tiles, scale and zero as int4_mm takes them."""
        x, out = _gemm_args(x, n, out)
        rc = self._int4_gemm(x.data_ptr(), tiles.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(),
                             out.dtype is torch.bfloat16, x.shape[0], n, x.shape[1], group_size,
                             torch.get_num_threads())
        return _gemm_done(rc, out)

    def int4_mm(self, x: torch.Tensor, tiles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                group_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] float32 or bfloat16 -> [M, N] in x's dtype, or into `out`. tiles uint8
        [N/16, K/8, 64] (gemv.c's tile layout), scale and zero bfloat16 [N/16, K/group_size, 16],
        all contiguous (as quant_matmul.pack_int4_tiles makes them; not checked here)."""
        m, k = x.shape
        n = tiles.shape[0] * 16
        if x.dtype not in DTYPES or not x.is_contiguous():
            x = x.float().contiguous()
        out = _output(out, m, n, x.dtype)
        self._int4_mm(x.data_ptr(), x.dtype is torch.bfloat16, tiles.data_ptr(), scale.data_ptr(),
                      zero.data_ptr(), out.data_ptr(), out.dtype is torch.bfloat16, m, n, k, group_size,
                      torch.get_num_threads())
        return out

    def int4_dequant_t(self, tiles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                       dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The int4_mm weight dequantized and transposed: [K, N] in dtype (float32 or bfloat16), or
        into `out` (contiguous, of that shape and dtype)."""
        n, k = tiles.shape[0] * 16, tiles.shape[1] * 8
        wt = torch.empty(k, n, dtype=dtype) if out is None else out
        if wt.shape != (k, n) or wt.dtype != dtype or dtype not in DTYPES or not wt.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} [{k}, {n}] (float32 or bfloat16)")
        self._int4_dequant_t(tiles.data_ptr(), scale.data_ptr(), zero.data_ptr(), wt.data_ptr(),
                             dtype is torch.bfloat16, n, k, group_size, torch.get_num_threads())
        return wt

    # ---- layers.c: a decode step's small ops (callers: kernels/cpu_layers.py) ---------
    # NOTE: arguments are not checked here (hot path); the callers pass contiguous rows of the
    # dtypes named, as layers.c's contract states.
    def paged_attention(self, q, k, v, slots, k_cache, v_cache, tables, seq_lens, query_start, out,
                        scale: float, window: int | None) -> None:
        """layers.c's bl_paged_attention: q [T, H, D], k and v [T, KVH, D] (rows with a head stride
        of D; k None: nothing written), slots [T], caches [KVH, NB, bs, D], tables [S, >= blocks],
        seq_lens [S] and query_start [S + 1] int64, out [T, H, D] contiguous in q's dtype."""
        T, H, D = q.shape
        KVH, NB, bs = k_cache.shape[:3]
        w = k is not None
        self._paged_attention(q.data_ptr(), q.dtype is torch.bfloat16, q.stride(0), k.data_ptr() if w else None,
                              k.stride(0) if w else 0, v.data_ptr() if w else None, v.stride(0) if w else 0,
                              slots.data_ptr() if w else None, k_cache.data_ptr(), v_cache.data_ptr(),
                              k_cache.dtype is torch.bfloat16, NB, bs, tables.data_ptr(), tables.stride(0),
                              seq_lens.data_ptr(), query_start.data_ptr(), out.data_ptr(), T, seq_lens.shape[0],
                              H, KVH, D, scale, window or 0, torch.get_num_threads())

    def add_rms_norm(self, x, residual, weight, out, eps: float) -> None:
        """layers.c's bl_add_rms_norm over rows [N, dim] (unit last stride), all of one dtype."""
        n, dim = x.shape
        self._add_rms_norm(x.data_ptr(), x.stride(0), residual.data_ptr() if residual is not None else None,
                           residual.stride(0) if residual is not None else 0, weight.data_ptr(),
                           out.data_ptr(), out.stride(0), x.dtype is torch.bfloat16, n, dim, eps,
                           torch.get_num_threads())

    def rotary(self, x, positions, cos, sin, out) -> None:
        """layers.c's bl_rotary: x [T, heads, D] (head stride D), positions [T] int64, half-width
        tables cos, sin [max_positions, rot / 2] in x's dtype, out [T, heads, D] contiguous."""
        T, heads, D = x.shape
        self._rotary(x.data_ptr(), x.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                     out.data_ptr(), x.dtype is torch.bfloat16, T, heads, D, 2 * cos.shape[1],
                     torch.get_num_threads())

    def silu_mul(self, gate_up, out) -> None:
        """layers.c's bl_silu_mul: gate_up [N, 2I] (unit last stride) -> out [N, I] contiguous."""
        n, inter = out.shape
        self._silu_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), gate_up.dtype is torch.bfloat16,
                       n, inter, torch.get_num_threads())


def _gemm_args(x: torch.Tensor, n: int, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """gemm.c's inputs: x as contiguous bfloat16, out [M, n] contiguous float32 or bfloat16."""
    if x.dtype is not torch.bfloat16 or not x.is_contiguous():
        x = x.to(torch.bfloat16).contiguous()
    return x, _output(out, x.shape[0], n, torch.bfloat16)


def _output(out: torch.Tensor | None, m: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """A matmul's output: a new [m, n] in dtype, or `out` checked (contiguous float32 or bfloat16)."""
    if out is None:
        return torch.empty(m, n, dtype=dtype)
    if out.shape != (m, n) or out.dtype not in DTYPES or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 or bfloat16 [{m}, {n}]")
    return out


def _gemm_done(rc: int, out: torch.Tensor) -> torch.Tensor:
    if rc:
        raise MemoryError(f"gemm.c: no memory for its weight panels (output {tuple(out.shape)})")
    return out


def _bind(fn, argtypes, restype=None):
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def _cpu_identity() -> str:
    model, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == platform.machine():
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{model}|{flags}"


def build(out_dir: Path, march: str = "native", compiler: str | None = None) -> Path:
    """Compile the SOURCES for `march` into out_dir (cached by key); returns the .so path.
    Raises RuntimeError with the compiler's message when the build fails."""
    cc = compiler or os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not cc:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    flags = (*CFLAGS, f"-march={march}")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"C compiler {cc} does not run: {e}") from e
    source = b"|".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(b"|".join([source, " ".join(flags).encode(), version.encode(),
                                    _cpu_identity().encode()])).hexdigest()[:16]
    path = out_dir / f"gemv-{key}.so"
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(out_dir)
    if path.exists():
        _check_private(path)
        return path
    fd, tmp = tempfile.mkstemp(prefix=".gemv.", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, *map(str, SOURCES), "-lm", "-o", tmp], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode:
            names = ", ".join(p.name for p in SOURCES)
            raise RuntimeError(f"{cc} failed on {names}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _check_private(path: Path) -> None:
    """A library is code this process runs: refuse one that another user could have written."""
    st = path.stat()
    if (hasattr(os, "getuid") and st.st_uid != os.getuid()) or st.st_mode & 0o022:
        raise RuntimeError(f"{path} is writable by other users or owned by another; batchlm does not "
                           "load native code from it (remove it, or set BATCHLM_CACHE_DIR)")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[NativeLib | None, str]:
    if os.environ.get("BATCHLM_NATIVE_KERNELS", "1") == "0":
        return None, "turned off by BATCHLM_NATIVE_KERNELS=0"
    try:
        return NativeLib(build(cache_root() / "native")), ""
    except (RuntimeError, OSError) as e:
        log.warning("batchlm's native CPU kernels are not available (%s); the torch kernels run instead", e)
        return None, str(e)


def library() -> NativeLib | None:
    return _load()[0]


def unavailable_reason() -> str:
    return _load()[1]
