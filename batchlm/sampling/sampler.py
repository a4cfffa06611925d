"""Sampler: logits [B, V] and one SamplingRow per row in, one token per row out.

Per step, in this order (vLLM / HF semantics where they agree):
1. min_tokens: eos and stop_token_ids at -inf while len(output) < min_tokens.
2. repetition, frequency and presence penalties (penalties.py).
3. greedy rows (temperature < 1e-5): argmax; top-k/top-p/min-p are ignored.
4. other rows: temperature, top-k, top-p, min-p (filters.py), then a draw
   by inverse CDF with one uniform per row (draw.py).
   A row with a proposed token (speculative decoding) keeps it with
   probability p(token), else draws from p without it (verify.py); a greedy
   row with one just takes the argmax (the engine compares).

A row with its own generator draws only from it, so a seeded request yields
the same tokens whichever rows share the batch and wherever it sits. Unseeded
rows draw batched from the shared generator (seeded once from `seed`).

Logprobs, when asked for, come from the raw logits (before steps 1-4).

Fast path: if every row is greedy with no penalties, min_tokens or logprobs,
the step is one argmax over [B, V].

Greedy picks are `greedy_argmax`: the first index of the row maximum, as
torch.argmax (and so transformers' greedy search) picks it.

The sampler keeps no per-request state and never mutates the caller's
logits. Columns >= vocab_size (padded model vocab) are never sampled.
NOTE: on CPU, fresh [B, V] allocations cost more than the math, so the
working buffer is reused across steps and every stage works in place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from batchlm.sampling.draw import inverse_cdf, row_uniforms
from batchlm.sampling.filters import apply_temperature, filter_probs_
from batchlm.sampling.logprobs import topk_logprobs
from batchlm.sampling.penalties import apply_penalties, suppress_min_tokens
from batchlm.sampling.plan import StepPlan
from batchlm.sampling.types import SamplerOutput, SamplingRow
from batchlm.sampling.verify import accept_drafts_, draft_uniforms


def greedy_argmax(x: Tensor) -> Tensor:
    """[B] long: per row of x [B, V], the first index of its maximum (NaN
    counts as the maximum), the same index as `x.argmax(-1)`.

    NOTE: `max(dim).indices`, not argmax: on the CPU, argmax's reduction is
    3-4x slower (measured, one thread, [1, 49152] fp32: ~65 vs ~23 us;
    [64, 49152]: ~7.6 vs ~4.6 ms on a loaded machine, 20 vs 4.8 ms on a busier one).
    """
    return x.max(dim=-1).indices


class Sampler:
    def __init__(self, vocab_size: int, device, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._buffer: Tensor | None = None  # [>= B, V] float32 working space

    def __call__(self, logits: Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B, V] with B == len(rows) ({len(rows)}), got {tuple(logits.shape)}")
        if logits.shape[1] < self.vocab_size:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than vocab_size {self.vocab_size}")
        raw = logits[:, : self.vocab_size]  # [B, V] view
        plan = StepPlan.build(rows)
        if plan.pure_argmax:
            return SamplerOutput(greedy_argmax(raw).tolist(), [None] * len(rows))

        x = self._workspace(len(rows), raw.device)  # [B, V] float32, contiguous
        x.copy_(raw)
        suppress_min_tokens(x, rows, plan.min_tokens_rows)
        apply_penalties(x, rows, plan.penalty_rows)
        token_ids = self._choose(x, rows, plan).tolist()

        logprobs: list[dict[int, float] | None] = [None] * len(rows)
        if plan.logprob_rows:
            lr = plan.logprob_rows
            sel = raw if len(lr) == len(rows) else raw[torch.tensor(lr, device=raw.device)]
            dicts = topk_logprobs(sel, [token_ids[i] for i in lr], [rows[i].params.logprobs for i in lr])
            for i, d in zip(lr, dicts):
                logprobs[i] = d
        return SamplerOutput(token_ids, logprobs)

    def _workspace(self, batch: int, device) -> Tensor:
        buf = self._buffer
        if buf is None or buf.shape[0] < batch or buf.device != device:
            buf = torch.empty(batch, self.vocab_size, dtype=torch.float32, device=device)
            self._buffer = buf
        return buf[:batch]

    def _choose(self, x: Tensor, rows: list[SamplingRow], plan: StepPlan) -> Tensor:
        """Token per row [B] long from adjusted logits x [B, V]; x is overwritten."""
        if not plan.sample_rows:
            return greedy_argmax(x)
        greedy = greedy_argmax(x) if plan.greedy_rows else None  # [B]
        # NOTE: greedy rows ride along (temperature 1, no filters, no draw) so
        # every stage runs in place on the whole buffer; their pick is `greedy`.
        params = [r.params for r in rows]
        apply_temperature(x, [1.0 if p.greedy else p.temperature for p in params])
        e = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()  # [B, V] unnormalised probs, row max 1
        filter_probs_(e,
                      [-1 if p.greedy else p.top_k for p in params],
                      [1.0 if p.greedy else p.top_p for p in params],
                      [0.0 if p.greedy else p.min_p for p in params])
        u = row_uniforms(rows, plan.sample_rows, self.generator, e.device)  # [B]
        dr = None
        if plan.draft_rows:  # speculative decoding: accept or resample (verify.py)
            dr = torch.tensor(plan.draft_rows, device=e.device)  # [n]
            drafts = torch.tensor([rows[i].draft_token_id for i in plan.draft_rows], device=e.device)  # [n]
            u2 = draft_uniforms(rows, plan.draft_rows, self.generator, e.device)  # [n]
            accepted = self._accept_drafts(e, dr, drafts, u[dr])  # [n]; e[dr, drafts] zeroed
            u[dr] = u2
        tokens = inverse_cdf(e, u)  # [B]
        if dr is not None:
            tokens[dr] = torch.where(accepted, drafts, tokens[dr])
        if greedy is not None:
            is_greedy = torch.zeros(len(rows), dtype=torch.bool, device=e.device)
            is_greedy[torch.tensor(plan.greedy_rows, device=e.device)] = True
            tokens = torch.where(is_greedy, greedy, tokens)
        return tokens

    def _accept_drafts(self, e: Tensor, rows: Tensor, drafts: Tensor, u: Tensor) -> Tensor:
        """The acceptance rule of speculative decoding (verify.accept_drafts_);
        a method so that a test can show a wrong rule failing the distribution test."""
        return accept_drafts_(e, rows, drafts, u)
