"""Prompt rules shared by the engine, the batch job's stages and `validate`.

Plain Python (no torch, no tokenizer import): every place that decides how
long a prompt may be, or what a rejected prompt's message says, calls these,
so the engine, the pipeline and `batchlm validate` cannot drift apart.

Contract
--------
- `default_max_model_len(hf_config, requested=None) -> int`: `requested`, or
  the model's `max_position_embeddings` capped at MAX_MODEL_LEN_CAP (the cap
  when the config names none).
- `prompt_error(num_tokens, max_model_len, continuation=0, remedy="") -> str |
  None`: why a prompt of `num_tokens` tokens cannot run, or None. Empty is an
  error; so is a prompt whose tokens plus `continuation` (scoring: the longest
  label's tokens, which are computed after the prompt) pass max_model_len. A
  generated continuation needs no room: generation stops at max_model_len.
  `remedy` is appended after "; " (the caller's own way to truncate).
- `room_after_prompt(max_tokens, label_token_ids=None) -> int`: the tokens a
  truncated prompt leaves room for: the longest label when classifying, else
  max_tokens (1 when None).
- `keep_last(max_model_len, room) -> int`: how many last tokens a truncated
  prompt keeps (at least 1).
- `label_token_ids(tokenizer, labels) -> list[list[int]]`: each label's tokens
  as a continuation (no special tokens).
"""
from __future__ import annotations

from collections.abc import Sequence

MAX_MODEL_LEN_CAP = 8192
EMPTY_PROMPT = "the prompt is empty"


def default_max_model_len(hf_config, requested: int | None = None) -> int:
    if requested:
        return int(requested)
    limit = getattr(hf_config, "max_position_embeddings", None) or MAX_MODEL_LEN_CAP
    return min(int(limit), MAX_MODEL_LEN_CAP)


def prompt_error(num_tokens: int, max_model_len: int, continuation: int = 0, remedy: str = "") -> str | None:
    if num_tokens <= 0:
        return EMPTY_PROMPT
    if num_tokens + continuation > max_model_len:
        plus = f" plus {continuation} label tokens" if continuation else ""
        msg = f"the prompt has {num_tokens} tokens{plus}, more than max_model_len={max_model_len}"
        return f"{msg}; {remedy}" if remedy else msg
    return None


def room_after_prompt(max_tokens: int | None, label_token_ids: Sequence[Sequence[int]] | None = None) -> int:
    if label_token_ids:
        return max(len(ids) for ids in label_token_ids)
    return max_tokens or 1


def keep_last(max_model_len: int, room: int) -> int:
    return max(1, max_model_len - room)


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer.encode(label, add_special_tokens=False)) for label in labels]
