"""The Hugging Face transformers baseline: batched greedy `generate`.

Contract: `run_hf(model, prompts, max_tokens, batch_size, ...)` feeds the
prompts (token-id lists) in input order, `batch_size` at a time, left-padded,
to `model.generate` (greedy, `max_new_tokens=max_tokens`) and returns an
`HFRun` with each request's generated token ids up to and including the first
eos (padding after it is not counted) and the wall time of the generate calls
plus padding. With `ignore_eos` no request stops before `max_tokens`.
`limit` measures only the first `limit` prompts (the caller labels any rate
derived from it as extrapolated).

What this module does not know: batchlm. It times nothing but transformers.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from batchlm.bench.report import OutputRates


@dataclass(frozen=True)
class HFRun(OutputRates):
    batch_size: int
    wall_s: float
    token_ids: list[list[int]]  # per measured prompt, eos included when hit
    num_prompts: int  # how many prompts were measured (a prefix of the workload)
    num_prompt_tokens: int


def load_hf_model(model_dir: str, dtype: str = "float32", device: str = "cpu"):
    """The transformers model in `dtype` on `device` (the device batchlm ran on:
    a GPU run's baseline on the same GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "auto": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    return model.to(device).eval()


def eos_token_ids(model) -> list[int]:
    """The eos ids `generate` stops on by default (generation config, then model config)."""
    for cfg in (model.generation_config, model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    return []


def _cut(row: list[int], eos: set[int], max_tokens: int) -> list[int]:
    row = row[:max_tokens]
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


def run_hf(model, prompts: list[list[int]], max_tokens: int, batch_size: int,
           ignore_eos: bool = False, limit: int | None = None, warmup: bool = True) -> HFRun:
    import torch
    from transformers import GenerationConfig

    prompts = prompts[:limit] if limit else prompts
    eos = eos_token_ids(model)
    pad = getattr(model.generation_config, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if eos else 0
    # NOTE: eos_token_id=[] (not None) is what stops transformers from falling
    # back to the model's eos, so that ignore_eos runs every row to the end.
    gen_cfg = GenerationConfig(max_new_tokens=max_tokens, do_sample=False,
                               eos_token_id=[] if ignore_eos else eos, pad_token_id=pad)
    stop = set() if ignore_eos else set(eos)

    def generate(batch: list[list[int]], cfg) -> list[list[int]]:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, T] left-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             generation_config=cfg)
        return [_cut(row, stop, max_tokens) for row in out[:, width:].tolist()]

    with torch.inference_mode():
        if warmup:
            tiny = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=[], pad_token_id=pad)
            generate([p[:16] for p in prompts[:2]], tiny)
        t0 = time.perf_counter()
        outputs: list[list[int]] = []
        for start in range(0, len(prompts), batch_size):
            outputs.extend(generate(prompts[start:start + batch_size], gen_cfg))
        wall = time.perf_counter() - t0
    return HFRun(batch_size, wall, outputs, len(prompts), sum(len(p) for p in prompts))
