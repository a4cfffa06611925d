"""DraftProposer: speculative proposals from a smaller model with the same
tokenizer (`speculative_config={"method": "draft", "model": ...}`).

Contract
--------
`DraftProposer.propose(seqs, limits, block_manager)` gives each decode
sequence (one token left to compute) up to limits[i] greedy tokens of the
draft model, written to seq.spec_token_ids. Greedy proposals are a function
of the history, so the proposal distribution is one-hot and the sampler's
rejection rule (keep with p(d), else draw from p without d) is exact.

The draft has its own KV cache tensors but shares the target's block tables
and block manager: a slot holds the target's keys in the target's cache and
the draft's in the draft's, so the draft's blocks are allocated, freed,
preempted and trimmed with the target's (the engine plans the KV budget
for both). `seq.draft_computed_tokens` counts the positions whose draft
keys/values are valid; each proposal first catches the draft up on the
positions it has not seen (the whole prompt for a new sequence, one or two
tokens after a verification), then runs k - 1 one-token steps. The engine
clamps the counter to `num_computed_tokens` after every step, so keys of
rejected proposals are never reused. Blocks for the proposals are taken
from free blocks only (never by preemption); the scheduler's `trim` gives
the rejected ones back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from batchlm.engine.model_runner import ModelRunner
from batchlm.kernels import get_attention_backend, get_layer_kernels
from batchlm.models import kv_cache_shape, load_model


@dataclass(eq=False)
class _DraftView:
    """What the model runner reads of a sequence, with the draft's counters."""

    token_ids: list[int]
    num_computed_tokens: int
    block_table: list[int]
    num_prompt_tokens: int  # the sequence's: its decodes are the rows past it (model_runner._is_decode)
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class DraftProposer:
    def __init__(self, loaded, attention, target_vocab_size: int):
        self.loaded = loaded
        self.model = loaded.module
        self.attention = attention
        self.kv_shape = kv_cache_shape(loaded.hf_config)  # (layers, kv heads, head dim)
        self.vocab_size = target_vocab_size  # a token past the target's vocab is never proposed
        self.runner: ModelRunner | None = None  # made by allocate_cache, once the engine planned the blocks

    @classmethod
    def load(cls, spec, dtype, device, attention_backend: str, target_tokenizer,
             target_vocab_size: int, layer_kernels: bool = False) -> "DraftProposer":
        attention = get_attention_backend(device, attention_backend)
        layers = get_layer_kernels(device, attention_backend, dtype) if layer_kernels else None
        try:
            loaded = load_model(spec.model, dtype, device, attention, None, layers)
        except (OSError, ValueError) as e:
            raise ValueError(f"speculative_config.model: cannot load the draft model {spec.model!r}: {e}") from e
        if loaded.tokenizer.get_vocab() != target_tokenizer.get_vocab():
            raise ValueError(f"speculative_config.model: the draft model {spec.model!r} has another tokenizer "
                             "than the target model (a draft must share its tokenizer)")
        return cls(loaded, attention, target_vocab_size)

    def bytes_per_block(self, block_size: int, kv_dtype: torch.dtype) -> int:
        return ModelRunner.bytes_per_block(*self.kv_shape, block_size, kv_dtype)

    def allocate_cache(self, num_blocks: int, block_size: int, kv_dtype: torch.dtype, device) -> None:
        self.runner = ModelRunner(self.model, self.attention, *self.kv_shape, num_blocks, block_size,
                                  kv_dtype, device)

    @torch.inference_mode()
    def propose(self, seqs, limits: list[int], bm) -> None:
        active = []
        reserve = len(seqs)  # NOTE: a free block per decode stays free: guesses never cause a preemption
        for seq, k in zip(seqs, limits):
            # Blocks for every position the draft writes: up to L - 1 + k - 1.
            while k > 0 and (bm.num_free_blocks - reserve < bm.blocks_needed(seq.num_tokens + k - 1)
                             - len(seq.block_table) or not bm.allocate(seq, seq.num_tokens + k - 1)):
                k -= 1
            if k > 0:
                active.append((seq, k))
        if not active:
            return
        views = {}
        step = []
        for seq, k in active:
            start = min(seq.draft_computed_tokens, seq.num_tokens - 1)
            view = _DraftView(list(seq.token_ids), start, seq.block_table, seq.num_prompt_tokens)
            views[seq] = view
            step.append((view, seq.num_tokens - start))
        for j in range(max(k for _, k in active)):
            run = self.runner.run(step)
            rows = [e.first_row + e.num_tokens - 1 for e in run.layout]
            logits = self.runner.logits(run.hidden, rows)[:, :self.vocab_size]  # [S, V]
            tokens = logits.max(dim=-1).indices.tolist()  # greedy: the first index of the maximum
            by_view = {id(e.seq): t for e, t in zip(run.layout, tokens)}
            nxt = []
            for seq, k in active:
                if j >= k:
                    continue
                view = views[seq]
                n = view.num_tokens - view.num_computed_tokens
                view.num_computed_tokens += n
                token = by_view[id(view)]
                seq.spec_token_ids.append(token)
                view.token_ids.append(token)
                seq.draft_computed_tokens = view.num_computed_tokens
                if j + 1 < k:
                    nxt.append((view, 1))
            step = nxt
            if not step:
                break
