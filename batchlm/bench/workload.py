"""Benchmark workloads: lists of prompt token ids, built deterministically.

Contract: every builder takes a Hugging Face tokenizer (anything with
`__call__(text, add_special_tokens=..., return_offsets_mapping=...)` and
`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`)
and returns a `Workload` whose prompts are token-id lists, so that batchlm and
the transformers baseline see exactly the same tokens. The same arguments and
seed give the same prompts.

Text comes from the Python documentation shipped with the interpreter
(`pydoc_data.topics`, PSF license): long English passages, no download needed.

What this module does not know: any engine. It imports no torch.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SUMMARIZE_INSTRUCTION = (
    "Summarize the following passage from the Python documentation in a few "
    "sentences, for a programmer who has not read it.\n\n{text}"
)
# An input-grounded task (the output copies long spans of the prompt): where
# speculative decoding by prompt lookup pays most.
REWRITE_INSTRUCTION = (
    "Rewrite the following passage from the Python documentation as plain text, "
    "keeping its wording and every detail.\n\n{text}"
)
INSTRUCTIONS = {"summarize": SUMMARIZE_INSTRUCTION, "rewrite": REWRITE_INSTRUCTION}


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]  # token ids, one list per request, in input order
    max_tokens: int  # new tokens per request (an upper bound unless ignore_eos)
    ignore_eos: bool  # True: every request generates exactly max_tokens
    description: str

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def pydoc_paragraphs() -> list[str]:
    """Paragraphs of the interpreter's own docs, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = para.strip()
            # Skip headings ("****") and one-liners: keep prose-like text.
            if len(para) >= 80 and not set(para) <= set("*=-~^ \n"):
                out.append(para)
    return out


class _Corpus:
    """The paragraphs joined into one text, tokenized once with char offsets."""

    def __init__(self, tokenizer):
        paragraphs = pydoc_paragraphs()
        self.text = "\n\n".join(paragraphs)
        enc = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
        self.offsets = enc["offset_mapping"]  # [(char_start, char_end)] per token
        # Token index at which each paragraph starts: passages begin cleanly.
        starts, pos = [], 0
        for para in paragraphs:
            starts.append(pos)
            pos += len(para) + 2
        tok_starts, j = [], 0
        for s in starts:
            while j < len(self.offsets) and self.offsets[j][1] <= s:
                j += 1
            tok_starts.append(j)
        self.paragraph_token_starts = tok_starts

    def passage(self, rng: random.Random, num_tokens: int) -> tuple[int, str]:
        """A passage of ~num_tokens tokens starting at a random paragraph."""
        n_tok = len(self.offsets)
        num_tokens = max(1, min(num_tokens, n_tok))
        candidates = [t for t in self.paragraph_token_starts if t + num_tokens <= n_tok]
        start = rng.choice(candidates) if candidates else 0
        return start, self._slice(start, num_tokens)

    def _slice(self, start: int, num_tokens: int) -> str:
        end = min(start + num_tokens, len(self.offsets)) - 1
        return self.text[self.offsets[start][0]:self.offsets[end][1]]


def _chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _raw_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _fit(corpus: _Corpus, rng: random.Random, wrap, target: int, lo: int, hi: int) -> list[int]:
    """Token ids of wrap(passage) with a length as close to target as we can get.

    NOTE: re-tokenizing a sliced passage inside a template does not add up
    exactly, so the passage length is corrected a few times; the result always
    lies in [lo, hi] unless the template alone is longer than hi.
    """
    overhead = len(wrap(""))
    n = max(1, target - overhead)
    start, _ = corpus.passage(rng, n)
    best = None
    for _ in range(8):
        ids = wrap(corpus._slice(start, n))
        if best is None or abs(len(ids) - target) < abs(len(best) - target):
            best = ids
        if len(ids) == target:
            break
        n = max(1, n + target - len(ids))
    if not lo <= len(best) <= hi:
        raise ValueError(f"could not build a prompt of {target} tokens in [{lo}, {hi}] "
                         f"(template alone is {overhead} tokens)")
    return best


def summarization_workload(tokenizer, num_prompts: int = 128, min_len: int = 100,
                           max_len: int = 600, max_tokens: int = 128,
                           seed: int = 0, task: str = "summarize") -> Workload:
    """The standard workload: chat-formatted summarization prompts whose total
    length (template included) is drawn uniformly from [min_len, max_len].
    task="rewrite": the same passages inside REWRITE_INSTRUCTION instead."""
    if task not in INSTRUCTIONS:
        raise ValueError(f"task must be one of {', '.join(INSTRUCTIONS)}, got {task!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"prompt length range must satisfy 1 <= min <= max, got [{min_len}, {max_len}]")
    rng = random.Random(seed)
    corpus = _Corpus(tokenizer)
    instruction = INSTRUCTIONS[task]
    wrap = lambda text: _chat_ids(tokenizer, instruction.format(text=text))  # noqa: E731
    prompts = [_fit(corpus, rng, wrap, rng.randint(min_len, max_len), min_len, max_len)
               for _ in range(num_prompts)]
    name = "summarization" if task == "summarize" else task
    return Workload(prompts, max_tokens, False,
                    f"{num_prompts} chat {name} prompts, {min_len}-{max_len} prompt tokens, "
                    f"up to {max_tokens} new tokens, greedy")


def fixed_length_workload(tokenizer, num_prompts: int, input_len: int, output_len: int | None,
                          max_tokens: int = 128, seed: int = 0) -> Workload:
    """Raw text prompts of exactly input_len tokens (when the tokenizer allows);
    with output_len every request generates exactly output_len tokens."""
    rng = random.Random(seed)
    corpus = _Corpus(tokenizer)
    wrap = lambda text: _raw_ids(tokenizer, text)  # noqa: E731
    slack = max(2, input_len // 50)
    prompts = [_fit(corpus, rng, wrap, input_len, max(1, input_len - slack), input_len + slack)
               for _ in range(num_prompts)]
    if output_len is not None:
        return Workload(prompts, output_len, True,
                        f"{num_prompts} raw prompts of ~{input_len} tokens, exactly {output_len} new tokens")
    return Workload(prompts, max_tokens, False,
                    f"{num_prompts} raw prompts of ~{input_len} tokens, up to {max_tokens} new tokens, greedy")


def read_texts(path: str | Path, text_column: str = "text") -> list[str]:
    """The text column of a JSONL or Parquet file, in row order."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    if path.suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise RuntimeError("reading Parquet needs pyarrow (pip install 'batchlm[pipeline]')") from e
        table = pq.read_table(path, columns=[text_column])
        texts = table.column(text_column).to_pylist()
    else:
        texts = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                row = json.loads(line)
                if text_column not in row:
                    raise KeyError(f"{path}:{i + 1}: no column {text_column!r} (has {sorted(row)})")
                texts.append(row[text_column])
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"{path}: column {text_column!r} has empty or non-text rows, e.g. row {bad[0]}")
    return texts


def dataset_workload(tokenizer, path: str | Path, text_column: str = "text",
                     chat: str | None = None, num_prompts: int | None = None,
                     max_tokens: int = 128, output_len: int | None = None) -> Workload:
    """Prompts from a file. chat: None (raw text), "raw" (the text as the user
    message) or "summarize" (the text inside the summarization instruction)."""
    texts = read_texts(path, text_column)[:num_prompts]
    if chat == "summarize":
        prompts = [_chat_ids(tokenizer, SUMMARIZE_INSTRUCTION.format(text=t)) for t in texts]
    elif chat == "raw":
        prompts = [_chat_ids(tokenizer, t) for t in texts]
    elif chat is None:
        prompts = [_raw_ids(tokenizer, t) for t in texts]
    else:
        raise ValueError(f"chat must be None, 'raw' or 'summarize', got {chat!r}")
    n_new = output_len if output_len is not None else max_tokens
    how = f"exactly {n_new}" if output_len is not None else f"up to {n_new}"
    return Workload(prompts, n_new, output_len is not None,
                    f"{len(prompts)} rows of {Path(path).name}[{text_column}] "
                    f"(chat={chat or 'off'}), {how} new tokens, greedy")
