"""Grammar state of constrained sequences: compiled once per spec, one matcher
per sequence, token masks per step for the constrained rows only.

Contract
--------
`StructuredDecoding(tokenizer, vocab_size, eos_token_ids)` belongs to one
engine (the grammar cache is its own, never a module global).
- `start(params)`: a `SeqGrammar` for one sequence. The spec's grammar is
  compiled against this tokenizer once per distinct `spec.key` (the template
  matcher), and each sequence gets a deep copy. ValueError naming the spec if
  the grammar fails against this tokenizer (before any step runs).
- `apply_masks_(logits, rows)`: rows = [(logits row, SeqGrammar)]; every
  token the grammar refuses at that state gets -inf, in place. The matchers
  fill one bitmask [n, ceil(V/32)] (in parallel, llguidance's executor), which
  is unpacked and written in one masked op. Columns past the matcher's vocab
  (a padded head) are refused. Other rows are never read or written.
- `SeqGrammar.advance(token, stop)`: the matcher consumes a sampled token and
  turns the usual stop decision into the final one: a complete grammar stops
  the sequence ("stop"), also where max_tokens was reached with it.
- `SeqGrammar.sync(output_token_ids)`: the matcher follows exactly these
  tokens (rolled back or rebuilt when they differ from what it consumed).

EOS: the mask allows EOS only where the grammar accepts (llguidance marks it so
when it knows the EOS ids, given here).

NOTE: backend choice (llguidance over xgrammar), measured on this 2-core CPU,
SmolLM2 tokenizer (V = 49152), a nested-object schema, one mask per step:
llguidance 0.014 ms (batch 1) / 0.25 ms (batch 32) median, first mask 2 / 16 ms,
schema compile ~1 ms; xgrammar 0.002 / 0.025 ms median, but 0.5-0.7 s compile
per schema, 300 ms first batch-32 mask, and it imports torch (1.7 s) where
llguidance checks a spec without torch or a tokenizer (StructuredOutputsParams).
Both are far below a model step (~100 ms at batch 32).
"""
from __future__ import annotations

import llguidance
import llguidance.hf
import torch
from torch import Tensor


class SeqGrammar:
    """One sequence's matcher and how many output tokens it has consumed."""

    __slots__ = ("matcher", "num_tokens")

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher
        self.num_tokens = 0

    def advance(self, token: int, stop: tuple | None) -> tuple | None:
        """Consume the sampled `token`; return the sequence's stop decision,
        given the one the usual stop rules made (`stop`). The grammar complete
        (nothing but EOS may follow, or EOS consumed) -> ("stop", None), also
        over "length" (the output is whole); a refused token -> ("error",
        None) (never for a masked row)."""
        m = self.matcher
        if not m.consume_token(token):
            return "error", None
        self.num_tokens += 1
        if m.is_stopped() and (stop is None or stop[0] == "length"):
            return "stop", None
        return stop

    def sync(self, output_token_ids: list[int]) -> None:
        """NOTE: the matcher's state must be a function of the tokens kept: after
        a preemption that kept fewer tokens than it consumed, roll back; when it
        has fewer than kept, consume the rest."""
        n = len(output_token_ids)
        if self.num_tokens > n:
            self.matcher.rollback(self.num_tokens - n)
            self.num_tokens = n
        elif self.num_tokens < n:
            self.matcher.consume_tokens(output_token_ids[self.num_tokens:])
            self.num_tokens = n


class StructuredDecoding:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]):
        self.hf_tokenizer = tokenizer
        self.vocab_size = max(vocab_size, len(tokenizer))
        self.eos = sorted(eos_token_ids) or None
        self._lltok = None  # built on the first constrained request (~0.5 s)
        self._templates: dict[str, llguidance.LLMatcher] = {}  # spec.key -> compiled, unused matcher
        self._executor = None
        self._shifts = torch.arange(32, dtype=torch.int32)  # [32] bit positions within a mask word

    @property
    def num_compiled(self) -> int:
        return len(self._templates)

    def start(self, params) -> SeqGrammar:
        spec = params.structured_outputs
        template = self._templates.get(spec.key)
        if template is None:
            if self._lltok is None:
                self._lltok = llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=self.eos)
            template = llguidance.LLMatcher(self._lltok, spec.llguidance_grammar(), log_level=0)
            if template.is_error():
                raise ValueError(f"StructuredOutputsParams.{spec.kind} cannot be used with this model's "
                                 f"tokenizer: {template.get_error()}")
            self._templates[spec.key] = template
        return SeqGrammar(template.deep_copy())

    @torch.inference_mode()  # NOTE: the runner's logits are inference tensors
    def apply_masks_(self, logits: Tensor, rows: list[tuple[int, SeqGrammar]]) -> None:
        """logits [B, C] (float): -inf, in place, where each listed row's grammar refuses the token."""
        if not rows:
            return
        n, cols = len(rows), logits.shape[1]
        words = (self.vocab_size + 31) // 32
        bitmask = torch.empty(n, words, dtype=torch.int32)  # [n, W], filled by the matchers
        if self._executor is None:
            self._executor = llguidance.LLExecutor()
        self._executor.unsafe_compute_mask_ptr([(g.matcher, i) for i, (_, g) in enumerate(rows)],
                                               bitmask.data_ptr(), words * 4, n)
        bits = (bitmask.unsqueeze(-1) >> self._shifts) & 1  # [n, W, 32]
        allowed = torch.zeros(n, cols, dtype=torch.bool)  # [n, C]; columns >= 32 * W stay refused
        k = min(cols, words * 32)
        allowed[:, :k] = bits.view(n, words * 32)[:, :k].bool()
        idx = torch.tensor([r for r, _ in rows], dtype=torch.long, device=logits.device)  # [n]
        sub = logits.index_select(0, idx)  # [n, C]
        sub.masked_fill_(~allowed.to(logits.device), float("-inf"))
        logits.index_copy_(0, idx, sub)
