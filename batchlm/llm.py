"""LLM: the offline API, shaped like vLLM's `LLM`.

    from batchlm import LLM, SamplingParams
    llm = LLM(model="smollm2-135m-instruct")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))

`generate` and `chat` return one RequestOutput per prompt, in input order;
`classify` returns one ClassificationOutput per prompt. A prompt that cannot
run comes back with `.error` set instead of raising, and the rest completes.

`on_finished` (optional, keyword-only, on all three): called in this thread with
each request's engine output as the engine finishes it (a RequestOutput; for
`classify` the scoring output, with `.prompt_token_ids` and `.error`), so a
caller can report progress from inside one long call.
"""
from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

from batchlm.config import EngineConfig
from batchlm.engine.llm_engine import LLMEngine
from batchlm.outputs import ClassificationOutput, RequestOutput
from batchlm.prompts import label_token_ids
from batchlm.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str = "smollm2-135m-instruct", *, dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 128,
                 max_num_batched_tokens: int | None = None, enable_prefix_caching: bool = True,
                 kv_cache_memory: int | None = None, seed: int = 0, device: str = "auto", **kwargs):
        self.config = EngineConfig(
            model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            kv_cache_memory=kv_cache_memory, seed=seed, device=device, **kwargs)
        self.engine = LLMEngine(self.config)
        self._next_id = 0

    # ---- properties ------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def model_dir(self) -> str:
        return str(self.engine.model_dir)

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. between benchmark repeats)."""
        self.engine.block_manager.reset_prefix_cache()

    # ---- generation ------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True, *, on_finished: Callable | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_list(sampling_params, len(prompts))
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = self._new_id()
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except ValueError:  # e.g. a grammar this tokenizer cannot serve: nothing of this call runs
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm, on_finished)

    def chat(self, messages, sampling_params=None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True, *,
             on_finished: Callable | None = None) -> list[RequestOutput]:
        """Generate for one conversation (a list of {role, content} dicts) or a
        list of them, after applying the model's chat template."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        params = self._params_list(sampling_params, len(convs))
        ids = []
        for conv, p in zip(convs, params):
            text = self.apply_chat_template(conv, chat_template, add_generation_prompt)
            rid = self._new_id()
            self.engine.add_request(rid, text, p, prompt_token_ids=self.engine.tokenize(text, False))
            ids.append(rid)
        return self._run(ids, use_tqdm, on_finished)

    def apply_chat_template(self, conversation, chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> str:
        tok = self.engine.tokenizer
        if chat_template is None and not tok.chat_template:
            raise ValueError(f"the model {self.config.model!r} has no chat template; pass chat_template=")
        return tok.apply_chat_template(conversation, chat_template=chat_template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

    def classify(self, prompts, labels: Seq[str], use_tqdm: bool = True,
                 add_special_tokens: bool = True, *,
                 on_finished: Callable | None = None) -> list[ClassificationOutput]:
        """Probability of each label after each prompt, from the model's
        log-likelihood of the label's tokens as a continuation (multi-token
        labels: the sum over their tokens), normalised over the labels.

        `prompts`: a string, a list of token ids, or a list of either (like
        `generate`). Token ids are scored as given (no special tokens added);
        strings are tokenized with `add_special_tokens`."""
        labels = list(labels)
        if not labels:
            raise ValueError("classify needs at least one label")
        if isinstance(prompts, str) or _is_token_list(prompts):
            prompts = [prompts]
        prompts = list(prompts)
        label_ids = label_token_ids(self.engine.tokenizer, labels)
        rids = []
        for prompt in prompts:
            rid = self._new_id()
            self.engine.add_score_request(rid, self._score_ids(prompt, add_special_tokens), label_ids)
            rids.append(rid)
        scores = self._run(rids, use_tqdm, on_finished)
        return [ClassificationOutput.from_scores(prompt if isinstance(prompt, str) else None, labels,
                                                 s.prompt_token_ids, s.logprobs, s.error)
                for prompt, s in zip(prompts, scores)]

    def _score_ids(self, prompt, add_special_tokens: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.tokenize(prompt, add_special_tokens) if prompt else []
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise TypeError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    # ---- internals -------------------------------------------------------------
    def _new_id(self) -> str:
        self._next_id += 1
        return f"llm-{self._next_id}"

    @staticmethod
    def _params_list(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return params

    def _run(self, request_ids: list[str], use_tqdm: bool, on_finished: Callable | None = None):
        results = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                results[out.request_id] = out
                if on_finished is not None:
                    on_finished(out)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [results[rid] for rid in request_ids]


def _is_token_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) for t in x)
