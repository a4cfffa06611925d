"""Which kernel each quantized layer runs, per batch size: measured, then kept.

Contract
--------
`plan_kernels(layers, dtype, device, cache_file=None) -> dict[str, list[(max_rows, kernel name)]]`
sets `layer.kernels` on every QuantLinear in `layers` and returns the plan by
shape. Layers with the same method, shape, group and dtype share one plan.
Where a method has more than one kernel (int8: batchlm's native GEMV where
it builds (kernels/cpu_native.py), its native many-row kernel on bf16
models where the CPU has AVX-512 BF16, the int8pack kernel or
dequantize-then-matmul, with the scales on the output or on the weight;
int4: batchlm's native GEMV and many-row kernel on its own layout where the
CPU has AVX-512 BF16, else the int4pack kernel, or dequantize-then-matmul), each is timed at 1,
4, 16, 64, 256 and 1024 rows on the layer's own weight (at up to 16 rows on
copies of it spanning 64 MB, so that it is read cold, as in a decode step;
one warm-up each,
then ROUNDS rounds that time every candidate once, in turn; the best time
of each) and the fastest is kept for batches up to that size;
larger batches use the choice at 1024 rows. Measured on a 2-core Xeon with
AMX (2026-11-26): the packed kernels win at a few rows, dequantize-then-matmul
wins once the matmul is compute-bound (AMX bf16); on a 2-core Zen 4 without AMX
(2026-11-27) the GEMVs win at 1-4 rows and gemm.c's many-row kernels from 16 up; on an AVX2-only EPYC the int8pack
kernel was 4-18x slower than fp32 (issue 7), which is why it is measured,
not assumed.

NOTE: best of ROUNDS, candidates in turn. The first planner timed each
kernel alone, median of 3: on this Xeon it kept int8pack for the default
model's LM head (49152x576) up to 64 rows, where int8pack takes 25-30 ms and
dequantize-then-matmul 11-14 ms (2026-11-26, 2 threads); a neighbour's
burst during one kernel's three runs decides a median of 3, while it has to
last through all ROUNDS rounds of the faster kernel to hide it from a best-of.
PLAN_FORMAT, ROWS and the candidates are part of the cache key, so plans
measured the old way are measured again.

NOTE: kernels of one method differ in rounding, so a new plan can change
outputs slightly. The plan is therefore kept in a JSON file (`cache_file`,
by default `<batchlm cache>/kernel_plans.json`) under a key naming the CPU
model, torch version and thread count: one machine type keeps one plan.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from batchlm.kernels import cpu_native
from batchlm.kernels import quant_matmul as qm

# NOTE: the last kernel of each method works at every batch size; a layer uses
# it until a plan is set.
CANDIDATES = {
    "int8": (qm.int8_native_mm, qm.int8_native_gemm, qm.int8_pack_mm, qm.int8_dequant_scaled_mm,
             qm.int8_dequant_mm),
    "int8_dynamic": (qm.int8_dynamic_mm,),
    "int4": (qm.int4_native_mm, qm.int4_native_gemm, qm.int4_pack_mm, qm.int4_native_dequant_mm,
             qm.int4_dequant_mm),
    "fp8": (qm.fp8_scaled_mm,),
}
BY_NAME = {fn.__name__: fn for fns in CANDIDATES.values() for fn in fns}
ROWS = (1, 4, 16, 64, 256, 1024)  # 1024: prefill chunks (the CPU's default step budget is 2048 tokens)
ROUNDS = 5
PLAN_FORMAT = 3  # in the cache key: a new way of measuring measures again
# NOTE: cold weights. A decode step reads every weight once, ~135 MB of them (int8, default model)
# between two reads of the same one, so each matmul reads its weight from memory. Timed hot (one
# weight again and again, 0.3-3 MB that stays in cache) int8pack looked as fast as the native
# kernel at 1-16 rows, so the plan kept it; read from memory (2-core Xeon, 2026-11-26, bf16, one
# row, 600 MB of distinct weights) 3072x576 takes 96-101 us native vs 160-165 int8pack.
COLD_ROWS = 16
COLD_BYTES = 64 << 20
MAX_COPIES = 256
UNBOUNDED = 1 << 62


def default_cache_file() -> Path:
    return cpu_native.cache_root() / "kernel_plans.json"


def machine_key(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    # the way plans are measured (format, rows, candidates): a change measures them again
    native = device.type == "cpu" and cpu_native.library() is not None
    how = (f"plan {PLAN_FORMAT} rows {ROWS} native {native} "
           + ",".join(fn.__name__ for fns in CANDIDATES.values() for fn in fns))
    raw = f"{name}|torch {torch.__version__}|threads {torch.get_num_threads()}|{how}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def fastest(fns, x, ws, rounds: int = ROUNDS):
    """The candidate with the best time on x against the weights `ws` (copies of one weight): one
    warm-up call each, then `rounds` rounds that time every candidate once, in turn, over all of
    `ws` (the time of a round is the mean over the copies)."""
    for fn in fns:
        fn(x, ws[0])
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for w in ws:
                fn(x, w)
            best[i] = min(best[i], (time.perf_counter() - t0) / len(ws))
    return fns[best.index(min(best))]


def cold_copies(packed, rows: int) -> list:
    """The weight as a decode step reads it: at up to COLD_ROWS rows, enough copies of `packed` to
    span COLD_BYTES, so each call reads its weight from memory rather than from cache; above
    that, the weight itself (there the matmul's arithmetic decides)."""
    if rows > COLD_ROWS:
        return [packed]
    fields = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    size = sum(v.numel() * v.element_size() for v in fields.values() if isinstance(v, torch.Tensor))
    n = max(1, min(MAX_COPIES, -(-COLD_BYTES // max(size, 1))))
    return [packed] + [type(packed)(**{k: v.clone() if isinstance(v, torch.Tensor) else v
                                       for k, v in fields.items()}) for _ in range(n - 1)]


def _measure(layer, dtype: torch.dtype, device: torch.device) -> list[tuple[int, str]]:
    fns = tuple(fn for fn in CANDIDATES[layer.qcfg.method] if qm.available(fn, device, layer.packed, dtype))
    if len(fns) == 1:
        return [(UNBOUNDED, fns[0].__name__)]
    best = []
    with torch.inference_mode():
        for rows in ROWS:
            x = torch.randn(rows, layer.in_features, dtype=dtype, device=device)
            best.append(fastest(fns, x, cold_copies(layer.packed, rows)).__name__)
    plan: list[tuple[int, str]] = []
    for rows, name in zip(ROWS, best):
        if plan and plan[-1][1] == name:
            plan[-1] = (rows, name)
        else:
            plan.append((rows, name))
    plan[-1] = (UNBOUNDED, plan[-1][1])
    return plan


def plan_kernels(layers, dtype: torch.dtype, device: torch.device, cache_file: Path | None = None):
    cache_file = cache_file or default_cache_file()
    machine = machine_key(device)
    try:
        stored = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        stored = {}
    known = stored.get(machine, {}) if isinstance(stored, dict) else {}
    plans: dict[str, list[tuple[int, str]]] = {}
    changed = False
    for layer in layers:
        key = (f"{layer.qcfg.method}:{layer.out_features}x{layer.in_features}:"
               f"g{layer.group_size}:{str(dtype).removeprefix('torch.')}")
        if key not in plans:
            plan = known.get(key)
            if not plan or any(name not in BY_NAME or not qm.available(BY_NAME[name], device, layer.packed, dtype)
                               for _, name in plan):
                plan = _measure(layer, dtype, device)
                known[key] = plan
                changed = True
            plans[key] = [(int(b), n) for b, n in plan]
        layer.kernels = [(b, BY_NAME[n]) for b, n in plans[key]]
    if changed:
        stored = stored if isinstance(stored, dict) else {}
        stored[machine] = known
        _write_json(cache_file, stored)
    return plans


def _write_json(path: Path, data) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".kernel_plans.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs a new measurement next time
