"""Sampler: logits [B, V] and one SamplingRow per row in, one token per row out.

Per step, in this order (vLLM / HF semantics where they agree):
1. min_tokens: eos and stop_token_ids at -inf while len(output) < min_tokens.
2. repetition, frequency and presence penalties (see penalties.py).
3. greedy rows (temperature < 1e-5): argmax; top-k/top-p/min-p are ignored.
4. other rows: temperature, top-k, top-p, min-p (see filters.py), then a draw.

Draws use the exponential race: token = argmax(probs / q), q ~ Exp(1) of
shape [V]. A row with its own generator draws its q from that generator
alone, so a seeded request yields the same tokens whichever rows share the
batch and wherever it sits. Unseeded rows draw batched from the shared
generator (seeded once from `seed`).

Logprobs, when asked for, come from the raw logits (before steps 1-4).

Fast path: if every row is greedy with no penalties, min_tokens or logprobs,
the step is one argmax over [B, V].

The sampler keeps no per-request state and never mutates the caller's
logits. Columns >= vocab_size (padded model vocab) are never sampled.
"""
from __future__ import annotations

import torch
from torch import Tensor

from batchlm.sampling.filters import apply_min_p, apply_temperature, apply_top_k_top_p
from batchlm.sampling.logprobs import topk_logprobs
from batchlm.sampling.penalties import apply_penalties, suppress_min_tokens
from batchlm.sampling.plan import StepPlan, has_filter
from batchlm.sampling.types import SamplerOutput, SamplingRow

# NOTE: q is clamped away from 0 so probs / q never makes inf or nan (0 / 0).
_MIN_NOISE = 1e-20


class Sampler:
    def __init__(self, vocab_size: int, device, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B, V] with B == len(rows) ({len(rows)}), got {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than vocab_size {self.vocab_size}")
        raw = logits[:, : self.vocab_size]  # [B, V] view
        plan = StepPlan.build(rows)
        if plan.pure_argmax:
            return SamplerOutput(raw.argmax(dim=-1).tolist(), [None] * len(rows))

        x = raw.to(torch.float32, copy=True, memory_format=torch.contiguous_format)  # [B, V]
        suppress_min_tokens(x, rows, plan.min_tokens_rows)
        apply_penalties(x, rows, plan.penalty_rows)
        tokens = self._choose(x, rows, plan)  # [B] long
        token_ids = tokens.tolist()

        logprobs: list[dict[int, float] | None] = [None] * len(rows)
        if plan.logprob_rows:
            lr = plan.logprob_rows
            sel = raw if len(lr) == len(rows) else raw[torch.tensor(lr, device=raw.device)]
            dicts = topk_logprobs(sel, [token_ids[i] for i in lr], [rows[i].params.logprobs for i in lr])
            for i, d in zip(lr, dicts):
                logprobs[i] = d
        return SamplerOutput(token_ids, logprobs)

    def _choose(self, x: Tensor, rows: list[SamplingRow], plan: StepPlan) -> Tensor:
        """Token per row [B] from adjusted logits x [B, V] (x may be modified)."""
        if not plan.sample_rows:
            return x.argmax(dim=-1)
        b_all = x.shape[0]
        if plan.greedy_rows:
            tokens = torch.empty(b_all, dtype=torch.long, device=x.device)
            g_idx = torch.tensor(plan.greedy_rows, device=x.device)
            tokens[g_idx] = x[g_idx].argmax(dim=-1)
            s_idx = torch.tensor(plan.sample_rows, device=x.device)
            tokens[s_idx] = self._sample(x[s_idx], [rows[i] for i in plan.sample_rows])
            return tokens
        return self._sample(x, rows)

    def _sample(self, x: Tensor, rows: list[SamplingRow]) -> Tensor:
        """Draw one token per row from x [b, V] (b non-greedy rows). Returns [b] long."""
        params = [r.params for r in rows]
        apply_temperature(x, [p.temperature for p in params])
        f = [i for i, r in enumerate(rows) if has_filter(r)]
        if f:
            if len(f) == len(rows):
                x = apply_top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
            else:
                f_idx = torch.tensor(f, device=x.device)
                x[f_idx] = apply_top_k_top_p(x[f_idx], [params[i].top_k for i in f],
                                             [params[i].top_p for i in f])
        if any(p.min_p > 0.0 for p in params):
            apply_min_p(x, [p.min_p for p in params])
        probs = x.softmax(dim=-1)  # [b, V]
        q = self._noise(probs, rows)  # [b, V]
        return probs.div_(q).argmax(dim=-1)

    def _noise(self, probs: Tensor, rows: list[SamplingRow]) -> Tensor:
        """Exp(1) noise [b, V]: seeded rows from their own generator, one [V] draw each."""
        q = torch.empty_like(probs)
        seeded = [i for i, r in enumerate(rows) if r.generator is not None]
        if not seeded:
            q.exponential_(generator=self.generator)
        else:
            unseeded = [i for i, r in enumerate(rows) if r.generator is None]
            if unseeded:
                u_idx = torch.tensor(unseeded, device=probs.device)
                q[u_idx] = torch.empty(len(unseeded), probs.shape[1], device=probs.device,
                                       dtype=probs.dtype).exponential_(generator=self.generator)
            for i in seeded:  # NOTE: per-row loop only here, for per-request generators
                q[i].exponential_(generator=rows[i].generator)
        return q.clamp_min_(_MIN_NOISE)
