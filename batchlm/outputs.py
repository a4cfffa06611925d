"""What generation returns, shaped like vLLM's RequestOutput/CompletionOutput."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# One position's logprobs: token id -> logprob (the sampled/actual token is
# always included, plus the top-k).
PositionLogprobs = dict[int, float]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None (running)
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[PositionLogprobs] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    error: str | None = None  # set when the request was rejected (e.g. prompt too long)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class ClassificationOutput:
    prompt: str | None
    labels: list[str]
    probs: list[float]  # one per label, summing to 1
    logprobs: list[float]  # total log-likelihood of each label's continuation
    num_prompt_tokens: int = 0
    error: str | None = None
    prompt_token_ids: list[int] = field(default_factory=list)  # what was scored

    @property
    def label(self) -> str | None:
        if self.error is not None:
            return None
        return self.labels[max(range(len(self.probs)), key=self.probs.__getitem__)]

    @classmethod
    def from_scores(cls, prompt: str | None, labels: list[str], prompt_token_ids: list[int],
                    logprobs: list[float], error: str | None = None) -> ClassificationOutput:
        """Probabilities from each label's log-likelihood, normalised over the labels (softmax)."""
        if error is not None:
            return cls(prompt, labels, [], [], len(prompt_token_ids), error, list(prompt_token_ids))
        top = max(logprobs)
        exps = [math.exp(lp - top) for lp in logprobs]
        z = sum(exps)
        return cls(prompt, labels, [e / z for e in exps], list(logprobs), len(prompt_token_ids), None,
                   list(prompt_token_ids))
