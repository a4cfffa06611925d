"""LLMEngine: requests in, outputs out, one `step()` at a time.

The step is three moves: schedule (which sequences, how many tokens), run
(model forward over the flat batch, logits for the rows that need them),
postprocess (sample, append, stop, free). Streaming consumers (the pipeline)
drive it through add_request / step / has_unfinished_requests /
abort_request; `batchlm.LLM` wraps it for whole batches.

With `speculative_config`, a step first gives every running decode its
proposals (seq.spec_token_ids, from NgramProposer or DraftProposer in
draft.py); the scheduler runs them after its last token, the LogitsPlan
gives that sequence one row per position, and `_sample` keeps the accepted
prefix plus one token (greedy: equal to the argmax; sampling: rejection
sampling in the sampler), then calls `Scheduler.accept_speculation`.

Bad requests never raise out of `step`: a request that cannot run (empty
prompt, prompt longer than max_model_len, larger than the whole KV cache)
comes back finished with `error` set, and the rest of the batch goes on. The
prompt-length rules and the max_model_len default are batchlm.prompts' (shared
with the batch job and `validate`).
"""
from __future__ import annotations

import itertools

import torch

from batchlm.config import EngineConfig
from batchlm.engine.block_manager import BlockManager
from batchlm.engine.device import EngineResources, resolve_resources
from batchlm.engine.draft import DraftProposer
from batchlm.engine.logits_plan import LogitsPlan, SampleRows
from batchlm.engine.model_runner import ModelRunner
from batchlm.engine.output_processor import OutputProcessor, Request, ScoreOutput
from batchlm.engine.scheduler import Scheduler
from batchlm.engine.sequence import Sequence
from batchlm.kernels import get_attention_backend, get_layer_kernels
from batchlm.models import kv_cache_shape, load_model
from batchlm.outputs import RequestOutput
from batchlm.prompts import default_max_model_len, prompt_error
from batchlm.sampling import Sampler, SamplingRow, prompt_logprobs, request_generator, token_logprobs
from batchlm.sampling_params import SamplingParams
from batchlm.speculative import NgramProposer, SpecStats, parse_speculative_config
from batchlm.speculative.adaptive import next_length
from batchlm.structured.decoding import StructuredDecoding

_NO_MORE_LOGITS = 1 << 62
_TRUNCATE_HINT = "set truncate_prompt_tokens to keep the last tokens"


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        # Speculative decoding (refused before the model loads when it cannot run).
        self.spec_config = parse_speculative_config(config.speculative_config)
        self.proposer = _proposer(self.spec_config)
        self.spec_stats = SpecStats()
        device, dtype, kv_dtype = resolve_resources(config)
        self.device = device
        attention = get_attention_backend(device, config.attention_backend, kv_dtype)
        # NOTE: compile_model fuses the layer ops itself: the PyTorch code then (layer kernels None).
        layers = None if config.compile_model else get_layer_kernels(device, config.attention_backend, dtype)
        loaded = load_model(config.model, dtype, device, attention, config.quantization, layers)
        self.loaded = loaded  # what was loaded: quantization, kernel plan, weight source
        self.model = loaded.module
        if config.compile_model:
            # Attention runs eagerly between compiled regions: its Python
            # loops over sequences would otherwise recompile on every step.
            attention.forward = torch.compiler.disable(attention.forward)
            self.model.model.compile(dynamic=True)
        self.tokenizer = loaded.tokenizer
        self.hf_config = loaded.hf_config
        self.model_dir = loaded.model_dir
        self.dtype = dtype
        self.max_model_len = default_max_model_len(self.hf_config, config.max_model_len)
        num_layers, kv_heads, head_dim = kv_cache_shape(self.hf_config)
        self.draft = None  # speculative_config method "draft": a second model sharing the block tables
        block_bytes = ModelRunner.bytes_per_block(num_layers, kv_heads, head_dim, config.block_size, kv_dtype)
        if self.spec_config is not None and self.spec_config.method == "draft":
            self.draft = DraftProposer.load(self.spec_config, dtype, device, config.attention_backend,
                                            self.tokenizer, self.hf_config.vocab_size, layers is not None)
            block_bytes += self.draft.bytes_per_block(config.block_size, kv_dtype)
        res: EngineResources = EngineResources.plan(config, device, kv_dtype, block_bytes)
        self.block_manager = BlockManager(res.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, res.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.max_num_batched_tokens = res.max_num_batched_tokens
        self.runner = ModelRunner(self.model, attention, num_layers, kv_heads, head_dim, res.num_blocks,
                                  config.block_size, kv_dtype, device)
        if self.draft is not None:
            self.draft.allocate_cache(res.num_blocks, config.block_size, kv_dtype, device)
        self.cuda_graphs = uses_cuda_graphs(config, device, attention)
        if self.cuda_graphs:
            self.runner.enable_cuda_graphs(config.max_num_seqs, self.max_model_len, self.hf_config.hidden_size,
                                           dtype)
        self.sampler = Sampler(self.hf_config.vocab_size, device, seed=config.seed)
        self.eos_token_ids = _eos_ids(self.hf_config, self.tokenizer, self.model_dir)
        self.output = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.structured = StructuredDecoding(self.tokenizer, self.hf_config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._ready: list = []  # outputs of requests rejected at admission
        self._arrival = itertools.count()
        self._seq_ids = itertools.count()

    # ---- requests ----------------------------------------------------------
    def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

    def add_request(self, request_id: str, prompt: str | list[int] | None,
                    params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None) -> None:
        params = params or SamplingParams()
        text, ids = self._prompt_ids(prompt, prompt_token_ids)
        # Grammars first: a spec this tokenizer cannot serve raises before the request is in.
        grammars = ([self.structured.start(params) for _ in range(params.n)]
                    if params.structured_outputs is not None else None)
        req = Request(request_id, text, ids, params)
        self._register(req)
        if params.truncate_prompt_tokens is not None and len(ids) > params.truncate_prompt_tokens:
            req.prompt_token_ids = ids = ids[-params.truncate_prompt_tokens:]
        error = (prompt_error(len(ids), self.max_model_len, remedy=_TRUNCATE_HINT)
                 or self._check_blocks(len(ids), 1 if params.max_tokens is None else params.max_tokens))
        if error:
            req.error = error
            self._ready.append(self.output.request_output(req))
            del self.requests[request_id]
            return
        lead = None
        for i in range(params.n):
            seq = self._new_seq(req, i, ids, params)
            seq.logits_from = 0 if params.prompt_logprobs is not None and i == 0 else len(ids) - 1
            seq.generator = request_generator(params, self.device, index=i)
            seq.grammar = grammars[i] if grammars else None
            if lead is not None and self.config.enable_prefix_caching:
                seq.wait_for = lead
            lead = lead or seq

    def add_score_request(self, request_id: str, prompt_token_ids: list[int],
                          continuations: list[list[int]]) -> None:
        """Score each continuation's log-likelihood after the prompt. The
        prompt is computed once: the other continuations wait for the first
        and reuse its blocks through the prefix cache."""
        req = Request(request_id, None, list(prompt_token_ids), SamplingParams(max_tokens=1),
                      continuation_lens=[len(c) for c in continuations])
        self._register(req)
        longest = max((len(c) for c in continuations), default=0)
        error = (prompt_error(len(prompt_token_ids), self.max_model_len, continuation=longest)
                 or self._check_blocks(len(prompt_token_ids), longest)
                 or ("every label must have at least one token" if any(not c for c in continuations) else None))
        if error:
            req.error = error
            self._ready.append(ScoreOutput(request_id, req.prompt_token_ids, [], error))
            del self.requests[request_id]
            return
        req.scores = [0.0] * len(continuations)
        lead = None
        for i, cont in enumerate(continuations):
            seq = self._new_seq(req, i, list(prompt_token_ids) + list(cont), req.params)
            seq.score_only = True
            seq.logits_from = len(prompt_token_ids) - 1
            if lead is not None and self.config.enable_prefix_caching:
                seq.wait_for = lead
            lead = lead or seq

    def _prompt_ids(self, prompt, prompt_token_ids):
        if prompt_token_ids is not None:
            return (prompt if isinstance(prompt, str) else None), list(prompt_token_ids)
        if isinstance(prompt, str):
            return prompt, (self.tokenize(prompt) if prompt else [])
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def _register(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in the engine")
        self.requests[req.request_id] = req

    def _check_blocks(self, num_prompt_tokens: int, new_tokens: int) -> str | None:
        """The prompt-length rules are batchlm.prompts'; this is the engine's own: the KV cache."""
        need = self.block_manager.blocks_needed(min(num_prompt_tokens + new_tokens, self.max_model_len))
        if need > self.block_manager.num_blocks:
            return (f"the request needs {need} KV-cache blocks but the cache holds only "
                    f"{self.block_manager.num_blocks}: raise kv_cache_memory")
        return None

    def _new_seq(self, req: Request, index: int, ids: list[int], params) -> Sequence:
        seq = Sequence(next(self._seq_ids), req.request_id, index, ids, params, next(self._arrival))
        req.seqs.append(seq)
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            for seq in req.seqs:
                self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._ready)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests) + len(self._ready)

    # ---- the step ------------------------------------------------------------
    def step(self) -> list[RequestOutput | ScoreOutput]:
        """Run one scheduling step; return the requests that finished in it."""
        finished, self._ready = self._ready, []
        if self.spec_config is not None:
            self._propose()
        sched = self.scheduler.schedule()
        if not sched:
            return finished
        run = self.runner.run(sched.scheduled)
        plan = LogitsPlan.build(run.layout)
        logits = self.runner.logits(run.hidden, plan.hidden_rows) if plan.hidden_rows else None
        self.scheduler.update_after_step(sched)
        touched = set()  # requests with a sequence that finished in this step
        if plan.samples:
            self._sample(plan.samples, logits[:plan.num_sample_rows])
            touched.update(s.seq.request_id for s in plan.samples if s.seq.is_finished)
        for pr in plan.prompts:
            self._prompt_scores(pr.seq, pr.lo, pr.hi, logits[pr.first_row:pr.first_row + pr.num_rows])
        for entry in run.layout:
            seq = entry.seq
            if seq.score_only and seq.prompt_done and not seq.is_finished:
                self.scheduler.finish(seq, "score")
                touched.add(seq.request_id)
            elif seq.prompt_done:
                seq.logits_from = _NO_MORE_LOGITS  # prompt logprobs are in: never recompute them
            # NOTE: draft keys past what the target computed came from rejected proposals.
            seq.draft_computed_tokens = min(seq.draft_computed_tokens, seq.num_computed_tokens)
        for rid in touched:
            req = self.requests.get(rid)
            if req is not None and req.finished:
                del self.requests[rid]
                finished.append(self._final_output(req))
        return finished

    def _propose(self) -> None:
        """Speculative decoding: proposals for every running decode, at most
        as many as its max_tokens (less the token verification adds anyway)
        and max_model_len leave room for; none in a step with more running
        decodes than speculative_config.disable_by_batch_size. Each sequence
        proposes up to its own adapted length (speculative.adaptive)."""
        decodes = []
        for seq in self.scheduler.running:
            seq.spec_token_ids = []
            # NOTE: constrained sequences never speculate (one sampling row, one mask).
            if (not seq.score_only and seq.grammar is None
                    and seq.num_tokens - seq.num_computed_tokens == 1):
                decodes.append(seq)
        if len(decodes) > self.spec_config.disable_by_batch_size:
            return
        limits = []
        for seq in decodes:
            p = seq.params
            room = self.max_model_len - seq.num_tokens
            if p.max_tokens is not None:
                room = min(room, p.max_tokens - seq.num_output_tokens - 1)
            k = self.spec_config.num_speculative_tokens if seq.spec_k is None else seq.spec_k
            limits.append(max(0, min(room, k)))
        if self.draft is not None:
            self.draft.propose(decodes, limits, self.block_manager)
            return
        for seq, room in zip(decodes, limits):
            if room > 0:
                seq.spec_token_ids = self.proposer.propose(seq.token_ids, room)

    def _sample(self, slices: list[SampleRows], logits: torch.Tensor) -> None:
        """Choose the next token(s) of each sequence. A speculating sequence
        has one row per proposal plus one: row j sees the proposals before it
        as already generated (penalties, min_tokens) and returns the proposal
        when verification accepts it. Tokens are appended and checked for
        stops one at a time; the first that is not its row's proposal (or
        the last row's token, or a stop) ends the sequence's step, so nothing
        past a stop or max_tokens is ever appended.

        Constrained sequences (structured outputs) first get their grammar's
        mask on their row, before the sampler (so penalties, temperature and
        filters, and the logprobs, see the masked logits, as in vLLM)."""
        self._mask_constrained(slices, logits)
        out = self.sampler(logits, self._sampling_rows(slices))
        row = 0
        for sl in slices:
            self._accept(sl, out, row)
            row += sl.num_rows

    def _mask_constrained(self, slices: list[SampleRows], logits: torch.Tensor) -> None:
        """The grammar's mask on each constrained sequence's row (one row:
        constrained sequences do not speculate), in place."""
        constrained, row = [], 0
        for sl in slices:
            if sl.seq.grammar is not None:
                sl.seq.grammar.sync(sl.seq.output_token_ids)
                constrained.append((row, sl.seq.grammar))
            row += sl.num_rows
        self.structured.apply_masks_(logits, constrained)

    def _sampling_rows(self, slices: list[SampleRows]) -> list[SamplingRow]:
        """One SamplingRow per logits row: row j of a speculating sequence sees
        its proposals before j as generated and carries proposal j to verify."""
        batch = []
        eos = self.eos_token_ids
        for sl in slices:
            s = sl.seq
            out_ids = s.output_token_ids
            drafts = sl.draft_token_ids
            for j in range(len(drafts) + 1):
                hist = out_ids + list(drafts[:j]) if j else out_ids
                batch.append(SamplingRow(s.params, s.prompt_token_ids, hist, s.generator, eos,
                                         drafts[j] if j < len(drafts) else None))
        return batch

    def _accept(self, sl: SampleRows, out, row: int) -> None:
        """Append sequence sl.seq's chosen tokens (rows row, row + 1, ...) one
        at a time, each checked for a stop, until one is not its row's
        proposal; account the speculation; finish the sequence on a stop."""
        seq, drafts = sl.seq, sl.draft_token_ids
        stop, accepted = None, 0
        for j in range(len(drafts) + 1):
            token = out.token_ids[row + j]
            seq.append_token(token)
            lp = out.logprobs[row + j]
            if lp is not None:
                seq.logprobs.append(lp)
                seq.cumulative_logprob += lp[token]
            stop = self.output.check_stop(seq, token)
            if seq.grammar is not None:
                stop = seq.grammar.advance(token, stop)
            if j == len(drafts) or token != drafts[j]:
                break
            accepted += 1
            if stop is not None:
                break
        if drafts:
            self.spec_stats.record(len(drafts), accepted)
            seq.spec_k = next_length(seq.spec_k or self.spec_config.num_speculative_tokens, len(drafts),
                                     accepted, self.spec_config.num_speculative_tokens)
            self.scheduler.accept_speculation(seq)  # before finish: publishes the accepted blocks
        if stop is not None:
            self.scheduler.finish(seq, *stop)

    def _prompt_scores(self, seq: Sequence, lo: int, hi: int, logits: torch.Tensor) -> None:
        targets = seq.token_ids[lo + 1:hi + 1]
        if seq.score_only:
            req = self.requests[seq.request_id]
            req.scores[seq.index] += sum(token_logprobs(logits, targets))
        else:
            seq.prompt_logprobs.extend(prompt_logprobs(logits, targets, seq.params.prompt_logprobs))

    def _final_output(self, req: Request):
        if req.continuation_lens is not None:
            return ScoreOutput(req.request_id, req.prompt_token_ids, list(req.scores))
        return self.output.request_output(req)

    # ---- stats -------------------------------------------------------------------
    def prefix_cache_hit_rate(self) -> float:
        bm = self.block_manager
        return bm.hit_tokens / bm.query_tokens if bm.query_tokens else 0.0


def uses_cuda_graphs(config: EngineConfig, device: torch.device, attention) -> bool:
    """Whether decode steps replay CUDA graphs: on CUDA, unless enforce_eager or
    compile_model, with an attention backend whose launches a graph can hold
    (Triton's; the reference attention loops over host-side lengths)."""
    return (device.type == "cuda" and not config.enforce_eager and not config.compile_model
            and getattr(attention, "name", None) == "triton")


def _proposer(spec) -> NgramProposer | None:
    """The n-gram proposer, or None (no speculation, or a draft model: see DraftProposer)."""
    if spec is None or spec.method != "ngram":
        return None
    return NgramProposer(spec.num_speculative_tokens, spec.prompt_lookup_min, spec.prompt_lookup_max)


def _eos_ids(hf_config, tokenizer, model_dir) -> frozenset[int]:
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    try:
        from transformers import GenerationConfig

        sources.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except (OSError, ValueError):
        pass
    for src in sources:
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(t) for t in src)
    return frozenset(ids)
