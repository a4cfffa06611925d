"""A sequence: one stream of tokens the engine computes (a request with n > 1
samples has n of them, sharing the prompt's blocks through the prefix cache).

Plain Python, no torch. The scheduler only looks at the counters:
`num_computed_tokens` (tokens whose keys/values are in the cache) against
`num_tokens` (prompt + generated so far). A step computes some of the
difference; when nothing is left to compute the engine samples the next token.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # sample index within its request
    prompt_token_ids: list[int]
    params: Any  # SamplingParams (kept untyped: no import cycle, no torch)
    arrival: int  # monotonic counter: FCFS order and "newest first" preemption
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Speculative decoding: tokens proposed for the positions after the last
    # one (not part of token_ids). While a decode sequence has them, the
    # scheduler budgets 1 + len(spec_token_ids) tokens for it and the engine
    # keeps the accepted prefix (Scheduler.accept_speculation).
    spec_token_ids: list[int] = field(default_factory=list)
    # How many tokens to propose next (speculative.adaptive); None: the configured k.
    spec_k: int | None = None
    # Draft-model speculation: positions whose draft keys/values are in the
    # draft's cache (never more than num_computed_tokens after a step).
    draft_computed_tokens: int = 0
    status: SeqStatus = SeqStatus.WAITING
    # First position whose logits must be computed (so the prefix cache may not
    # skip it): len(prompt) - 1 for plain generation, 0 for prompt_logprobs,
    # the position before the label for scoring.
    logits_from: int = 0
    score_only: bool = False  # finish once the prompt is computed; never sample
    # Another sequence whose prompt this one shares; while that one is still
    # computing its prompt this one waits, so it can reuse the cached blocks.
    wait_for: "Sequence | None" = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generator: Any = None  # torch.Generator for seeded sampling (engine-owned)
    # Structured outputs: the grammar's matcher (structured.decoding.SeqGrammar), engine-owned;
    # it has consumed exactly the output tokens once the engine syncs it for a step.
    grammar: Any = None
    # Outputs gathered as it runs (engine-owned).
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    detok: Any = None  # incremental detokenizer state, when stop strings are set
    preemptions: int = 0

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def prompt_done(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
