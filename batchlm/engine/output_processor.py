"""After a token is sampled: append it, detokenize, decide whether the
sequence stops, and build the user-facing outputs of finished requests.

Stop rules, in order (like vLLM): EOS (unless ignore_eos) and stop_token_ids
once min_tokens are out; max_tokens; max_model_len; stop strings (left out of
the text unless include_stop_str_in_output).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from batchlm.engine.detokenizer import IncrementalDetokenizer, find_stop
from batchlm.engine.sequence import Sequence
from batchlm.outputs import CompletionOutput, RequestOutput


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: object
    seqs: list[Sequence] = field(default_factory=list)
    error: str | None = None
    # scoring requests: one sequence per continuation
    continuation_lens: list[int] | None = None
    scores: list[float] | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class ScoreOutput:
    """Log-likelihood of each continuation after one prompt."""

    request_id: str
    prompt_token_ids: list[int]
    logprobs: list[float]
    error: str | None = None
    finished: bool = True


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: frozenset[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def check_stop(self, seq: Sequence, token: int) -> tuple[str, object] | None:
        """Called after `token` was appended; returns (finish_reason, stop_reason)."""
        p = seq.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:  # the sampler kept EOS/stop ids out before that
            if not p.ignore_eos and token in self.eos_token_ids:
                return "stop", None
            if token in p.stop_token_ids:
                return "stop", token
        if p.stop and n_out >= p.min_tokens:
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, p.skip_special_tokens)
                for t in seq.output_token_ids[:-1]:
                    seq.detok.add(t)
            delta = seq.detok.add(token)
            hit = find_stop(seq.detok.text, len(delta), p.stop) if delta else None
            if hit is not None:
                stop, idx = hit
                seq.detok.text = seq.detok.text[:idx + (len(stop) if p.include_stop_str_in_output else 0)]
                return "stop", stop
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return "length", None
        if seq.num_tokens >= self.max_model_len:
            return "length", None
        return None

    def text_of(self, seq: Sequence) -> str:
        if seq.detok is not None:
            return seq.detok.text
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and (
                ids[-1] in self.eos_token_ids or ids[-1] == seq.stop_reason):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)

    def request_output(self, req: Request) -> RequestOutput:
        if req.error is not None:
            comp = [CompletionOutput(index=0, text="", token_ids=[], finish_reason="error")]
            return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comp,
                                 finished=True, error=req.error)
        comps = []
        for seq in req.seqs:
            want_lp = seq.params.logprobs is not None
            comps.append(CompletionOutput(
                index=seq.index, text=self.text_of(seq) if seq.is_finished else "",
                token_ids=seq.output_token_ids, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason, logprobs=seq.logprobs if want_lp else None,
                cumulative_logprob=seq.cumulative_logprob if want_lp else None))
        plp = None
        if req.params.prompt_logprobs is not None and req.seqs:
            # Position 0 has no logprob (nothing precedes it), as in vLLM.
            plp = [None] + req.seqs[0].prompt_logprobs
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, comps,
                             finished=req.finished, prompt_logprobs=plp)
