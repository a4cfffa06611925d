"""`python -m batchlm bench kernels`: each kernel's median time, achieved
GB/s and TFLOP/s, against ceilings measured on the same device in the same
run (a large device copy: read + write bytes / s; a large bf16 matmul).

Contract
--------
`run(args) -> exit code`; `measure(opts) -> dict` (the report: device,
dtype, ceilings, one row per kernel and implementation). On CUDA both the
Triton kernels and their PyTorch references run; on the CPU only the
references (Triton runs there only in its interpreter, which says nothing
about speed) and the report says so. Sizes default per device: the issue's
headline case on CUDA (decode attention, 256 sequences x 1024 context; the
default model's shapes: 9 heads, 3 kv heads, head dim 64, hidden 576,
intermediate 1536), small ones on the CPU so that it ends within a minute.

Bytes are the least traffic a kernel needs (each input read once, each output
written once; a decode reads each sequence's keys and values once), FLOPs the
matmul work of attention (4 x query x key pairs x head dim) or the
elementwise ops. Timing (`time_call`): CUDA events around each of
`repeats` calls queued back to back, the L2 cache flushed before each
(CPU: perf_counter around one call), after warm-ups; the median.

`--decode-sweep` (CUDA only) also times the Triton decode kernels alone
(split + merge, no cache write) at the decode size under each tiling of
`DECODE_SWEEP`, each checked against the reference's output first: how
`DECODE_TILING` in batchlm/kernels/triton_attention.py was chosen, and how
to choose it again for another card.
"""
from __future__ import annotations

import itertools
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchlm.kernels.attention import AttentionMetadata, TorchPagedAttention

SIZES = {  # per device type: the defaults of the size options
    "cuda": dict(decode_seqs=256, decode_context=1024, prefill_seqs=8, prefill_len=1024, tokens=4096,
                 copy_mib=1024, matmul_n=8192),
    "cpu": dict(decode_seqs=16, decode_context=256, prefill_seqs=2, prefill_len=128, tokens=64,
                copy_mib=64, matmul_n=1024),
}
L2_FLUSH_BYTES = 256 << 20  # above any current GPU's L2 (H100: 50 MiB)
CPU_NOTE = "Triton needs CUDA: on the CPU only the PyTorch references ran"


@dataclass(frozen=True)
class KernelOptions:
    device: str = "auto"
    dtype: str = "auto"
    heads: int = 9
    kv_heads: int = 3
    head_dim: int = 64
    hidden: int = 576
    intermediate: int = 1536
    block_size: int = 16
    decode_seqs: int | None = None
    decode_context: int | None = None
    prefill_seqs: int | None = None
    prefill_len: int | None = None
    tokens: int | None = None  # rows of the layer kernels
    decode_sweep: bool = False
    copy_mib: int | None = None
    matmul_n: int | None = None
    warmup: int = 3
    repeats: int = 20

    def size(self, name: str, device: torch.device) -> int:
        value = getattr(self, name)
        return SIZES[device.type][name] if value is None else value


def time_call(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of fn() over `repeats` calls, after `warmup`.

    On CUDA the calls are queued back to back, each between two events and
    after a write of L2_FLUSH_BYTES (so no call finds its inputs in the L2
    cache), and the host waits once at the end: a kernel's time is the
    device's, not the host's launch latency, as when a CUDA graph replays
    it. (Waiting after each call, as this did before 2026-11-26, added the
    host's launch time to every figure: on an H100 the same decode kernels
    and tiling took 147.8 us timed that way, 89.0 us queued.)"""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ceilings(device: torch.device, copy_mib: int, matmul_n: int, warmup: int, repeats: int) -> dict:
    """Device copy GB/s (read + write) and bf16 matmul TFLOP/s, measured here and now."""
    n = copy_mib << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    copy_s = time_call(lambda: dst.copy_(src), device, warmup, repeats)
    a = torch.randn(matmul_n, matmul_n, device=device).to(torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, device=device).to(torch.bfloat16)
    out = torch.empty_like(a)
    mm_s = time_call(lambda: torch.matmul(a, b, out=out), device, warmup, max(3, repeats // 4))
    return {"copy_gb_s": 2 * n / copy_s / 1e9, "copy_mib": copy_mib,
            "matmul_bf16_tflop_s": 2 * matmul_n ** 3 / mm_s / 1e12, "matmul_n": matmul_n}


def paged_step(lens: list[tuple[int, int]], o: KernelOptions, dtype, device, g):
    """q, k, v, caches and metadata of one step of (past, new) tokens per sequence
    (decodes first), blocks scattered over the cache."""
    bs, KVH, D = o.block_size, o.kv_heads, o.head_dim
    num_blocks = sum(-(-(p + n) // bs) for p, n in lens) + 1
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, slots = [], []
    for past, new in lens:
        table = [perm.pop() for _ in range(-(-(past + new) // bs))]
        tables.append(table)
        slots += [table[p // bs] * bs + p % bs for p in range(past, past + new)]
    T = sum(n for _, n in lens)
    width = max(len(t) for t in tables)
    qlens = [n for _, n in lens]

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    cache = [rand(KVH, num_blocks, bs, D), rand(KVH, num_blocks, bs, D)]
    qkv = rand(T, o.heads + 2 * KVH, D)
    q, k, v = qkv.split([o.heads, KVH, KVH], dim=1)  # strided views, as the model passes them
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], device=device),
        seq_lens=torch.tensor([p + n for p, n in lens], device=device),
        query_start_loc=torch.tensor([0] + list(itertools.accumulate(qlens)), device=device),
        num_decodes=sum(1 for n in qlens if n == 1), seq_lens_list=[p + n for p, n in lens],
        query_lens_list=qlens, block_size=bs, block_tables_list=tables)
    return q, k, v, cache, meta


def cases(o: KernelOptions, device: torch.device, dtype, triton: bool):
    """(kernel, shape text, bytes, flops, {impl: fn}) for every kernel."""
    g = torch.Generator().manual_seed(0)
    el = torch.tensor([], dtype=dtype).element_size()
    H, KVH, D = o.heads, o.kv_heads, o.head_dim
    scale = 1 / math.sqrt(D)
    ref_attn = TorchPagedAttention()
    tri_attn = None
    if triton:
        from batchlm.kernels import triton_layers as tk
        from batchlm.kernels.triton_attention import TritonPagedAttention, write_kv

        tri_attn = TritonPagedAttention(device)

    def attn_impls(q, k, v, cache, meta):
        # NOTE: a fresh metadata each call: backends cache per-step values in meta.derived.
        def call(backend):
            return lambda: backend.forward(q, k, v, cache[0], cache[1], _fresh(meta), scale)
        impls = {"torch": call(ref_attn)}
        if tri_attn is not None:
            impls["triton"] = call(tri_attn)
        return impls

    B, ctx = o.size("decode_seqs", device), o.size("decode_context", device)
    step = paged_step([(ctx - 1, 1)] * B, o, dtype, device, g)
    yield ("decode attention", f"{B} seqs x {ctx} ctx, H{H}/KV{KVH}/D{D}, block {o.block_size}",
           (2 * B * ctx * KVH * D + 2 * B * H * D) * el, 4 * B * H * ctx * D, attn_impls(*step))

    S, L = o.size("prefill_seqs", device), o.size("prefill_len", device)
    step = paged_step([(0, L)] * S, o, dtype, device, g)
    yield ("prefill attention", f"{S} seqs x {L} tokens (causal), H{H}/KV{KVH}/D{D}",
           (2 * S * L * KVH * D + 2 * S * L * H * D) * el, 4 * S * H * (L * (L + 1) // 2) * D,
           attn_impls(*step))

    N = o.size("tokens", device)
    q, k, v, cache, meta = paged_step([(0, 1)] * N, o, dtype, device, g)
    kv_write = {"torch": lambda: (cache[0].view(KVH, -1, D).index_copy_(1, meta.slot_mapping, k.transpose(0, 1)),
                                  cache[1].view(KVH, -1, D).index_copy_(1, meta.slot_mapping, v.transpose(0, 1)))}
    if triton:
        kv_write["triton"] = lambda: write_kv(k, v, cache[0], cache[1], meta.slot_mapping)
    yield "kv cache write", f"{N} tokens x KV{KVH}/D{D}", 4 * N * KVH * D * el, 0, kv_write

    from batchlm.models.llama import RMSNorm

    norm = RMSNorm(o.hidden, 1e-5).to(dtype).to(device)
    x = torch.randn(N, o.hidden, generator=g).to(dtype).to(device)
    res = torch.randn(N, o.hidden, generator=g).to(dtype).to(device)
    out = torch.empty_like(x)
    impls = {"torch": lambda: norm(x + res)}
    if triton:
        impls["triton"] = lambda: tk.add_rms_norm(x, res, norm.weight, 1e-5, out)
    yield "residual add + rmsnorm", f"{N} x {o.hidden}", 4 * N * o.hidden * el, 5 * N * o.hidden, impls

    from transformers import LlamaConfig

    from batchlm.models.rope import RotaryEmbedding

    emb = RotaryEmbedding(LlamaConfig(hidden_size=H * D, num_attention_heads=H, max_position_embeddings=4096),
                          D, dtype)
    positions = torch.randint(0, 4096, (N,), generator=g).to(device)
    xr = torch.randn(N, H + KVH, D, generator=g).to(dtype).to(device)
    cos, sin = emb.lookup(positions)
    out_r = torch.empty_like(xr)
    impls = {"torch": lambda: emb.apply(xr, cos, sin)}
    if triton:
        impls["triton"] = lambda: tk.rotary(xr, positions, *emb.tables(device), out_r)
    yield "rotary", f"{N} x {H + KVH} heads x D{D}", 2 * N * (H + KVH) * D * el, 3 * N * (H + KVH) * D, impls

    inter = o.intermediate
    gate_up = torch.randn(N, 2 * inter, generator=g).to(dtype).to(device)
    out_s = torch.empty(N, inter, dtype=dtype, device=device)
    impls = {"torch": lambda: F.silu(gate_up[:, :inter]) * gate_up[:, inter:]}
    if triton:
        impls["triton"] = lambda: tk.silu_and_mul(gate_up, out_s)
    yield "silu and mul", f"{N} x {inter}", 3 * N * inter * el, 5 * N * inter, impls


def decode_sweep(o: KernelOptions, device: torch.device, dtype, seed: int = 1) -> list[dict]:
    """The decode kernels alone under each tiling of DECODE_SWEEP (see the contract)."""
    from batchlm.kernels import triton_attention as ta

    g = torch.Generator().manual_seed(seed)
    B, ctx = o.size("decode_seqs", device), o.size("decode_context", device)
    q, k, v, cache, meta = paged_step([(ctx - 1, 1)] * B, o, dtype, device, g)
    q = q.contiguous()
    scale = 1 / math.sqrt(o.head_dim)
    ref = TorchPagedAttention().forward(q, k, v, cache[0], cache[1], _fresh(meta), scale).float()
    el = torch.tensor([], dtype=dtype).element_size()
    nbytes = (2 * B * ctx * o.kv_heads * o.head_dim + 2 * B * o.heads * o.head_dim) * el
    most = ta.attended_blocks(meta.seq_lens_list, o.block_size, None)
    target = ta.TritonPagedAttention(device).target_programs
    rows = []
    for split_blocks, tiling in ta.DECODE_SWEEP:
        if split_blocks is None:  # the backend's own choice
            split = ta.decode_split(most, B, o.kv_heads, target)
        else:
            split = ta.decode_split(most, B, o.kv_heads, None, min_split_blocks=split_blocks)
        out = torch.full_like(q, float("nan"))

        def call(tiling=tiling, split=split, out=out):
            ta.paged_decode(q, cache[0], cache[1], meta.block_tables, meta.seq_lens, scale, None, out, split,
                            tiling)
        default = split_blocks is None and tiling == ta.DECODE_TILING
        row = {"kernel": "decode tiling", "impl": "triton", "tiling": tiling._asdict(),
               "split_blocks": split_blocks, "splits": split.num_splits,
               "shape": f"split {split_blocks or 'auto'} tile {tiling.tile} warps {tiling.num_warps} "
                        f"stages {tiling.num_stages}" + (" (default)" if default else "")}
        try:
            call()
        except Exception as e:  # a tiling this card cannot compile or run: reported, not fatal
            rows.append({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            continue
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            rows.append({**row, "error": f"relative error {err:.3g} against the reference"})
            continue
        s = time_call(call, device, o.warmup, o.repeats)
        rows.append({**row, "median_us": s * 1e6, "gb_s": nbytes / s / 1e9, "rel_err": err, "bytes": nbytes})
    return rows


def _fresh(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc,
                             meta.num_decodes, meta.seq_lens_list, meta.query_lens_list, meta.block_size,
                             meta.block_tables_list)


def measure(o: KernelOptions) -> dict:
    from batchlm.engine.device import auto_dtype

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if o.device == "auto" else o.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={o.device!r} was asked for but CUDA is not available")
    dtype = auto_dtype(device) if o.dtype == "auto" else getattr(torch, o.dtype)
    if o.heads % o.kv_heads:
        raise ValueError(f"heads ({o.heads}) must be a multiple of kv_heads ({o.kv_heads})")
    triton = device.type == "cuda"
    if o.decode_sweep and not triton:
        raise ValueError("--decode-sweep times the Triton decode kernel: it needs CUDA")
    ceil = ceilings(device, o.size("copy_mib", device), o.size("matmul_n", device), o.warmup, o.repeats)
    rows = []
    with torch.inference_mode():
        for kernel, shape, nbytes, flops, impls in cases(o, device, dtype, triton):
            for impl, fn in impls.items():
                s = time_call(fn, device, o.warmup, o.repeats)
                gbs, tfs = nbytes / s / 1e9, flops / s / 1e12
                rows.append({"kernel": kernel, "impl": impl, "shape": shape, "median_us": s * 1e6,
                             "gb_s": gbs, "tflop_s": tfs, "bytes": nbytes, "flops": flops,
                             "pct_copy_bw": 100 * gbs / ceil["copy_gb_s"],
                             "pct_matmul": 100 * tfs / ceil["matmul_bf16_tflop_s"]})
        if o.decode_sweep:
            for r in decode_sweep(o, device, dtype):
                if "gb_s" in r:
                    r["pct_copy_bw"] = 100 * r["gb_s"] / ceil["copy_gb_s"]
                rows.append(r)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
            "date": time.strftime("%Y-%m-%d"), "triton": triton, "note": None if triton else CPU_NOTE,
            "ceilings": ceil, "rows": rows}


def format_report(rep: dict) -> str:
    c = rep["ceilings"]
    lines = [f"device {rep['device']}  dtype {rep['dtype']}  {rep['date']}",
             f"ceilings: copy {c['copy_gb_s']:.1f} GB/s ({c['copy_mib']} MiB), "
             f"bf16 matmul {c['matmul_bf16_tflop_s']:.2f} TFLOP/s (n={c['matmul_n']})"]
    if rep["note"]:
        lines.append(rep["note"])
    lines.append(f"{'kernel':24} {'impl':6} {'median us':>10} {'GB/s':>9} {'%copy':>6} {'TFLOP/s':>8} "
                 f"{'%mm':>6}  shape")
    for r in rep["rows"]:
        if "error" in r:
            lines.append(f"{r['kernel']:24} {r['impl']:6} {'failed':>10}  {r['shape']}: {r['error']}")
            continue
        if r["kernel"] == "decode tiling":
            lines.append(f"{r['kernel']:24} {r['impl']:6} {r['median_us']:10.1f} {r['gb_s']:9.2f} "
                         f"{r['pct_copy_bw']:6.1f} {'':>8} {'':>6}  {r['shape']}, {r['splits']} splits")
            continue
        lines.append(f"{r['kernel']:24} {r['impl']:6} {r['median_us']:10.1f} {r['gb_s']:9.2f} "
                     f"{r['pct_copy_bw']:6.1f} {r['tflop_s']:8.3f} {r['pct_matmul']:6.1f}  {r['shape']}")
    return "\n".join(lines)


def run(args) -> int:
    from batchlm.bench.report import write_json

    fields = KernelOptions.__dataclass_fields__
    opts = KernelOptions(**{k: v for k, v in vars(args).items() if k in fields})
    try:
        rep = measure(opts)
    except ValueError as e:
        raise SystemExit(f"bench kernels: {e}") from None
    print(format_report(rep))
    if args.json:
        write_json(args.json, rep)
    return 0
