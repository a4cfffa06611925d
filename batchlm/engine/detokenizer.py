"""Incremental detokenization and stop strings.

Decoding a growing list of token ids one token at a time is not the same as
decoding each token alone (multi-byte characters span tokens, some tokenizers
merge spaces), so each step decodes a short window of recent ids and emits
only the text that became final. A few prompt tokens seed the window so the
first generated token is decoded in context.
"""
from __future__ import annotations


class IncrementalDetokenizer:
    _CONTEXT = 6

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-self._CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it made final (may be '')."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


def find_stop(text: str, delta_len: int, stops: list[str]) -> tuple[str, int] | None:
    """The first stop string that appears in `text` and overlaps its last
    `delta_len` characters, with its start index; None if there is none."""
    best = None
    for stop in stops:
        start = max(0, len(text) - delta_len - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    return best
