"""Workload builders: lengths in range, deterministic, dataset files."""
import json

import pytest

from batchlm.bench import workload as wl


def test_summarization_lengths_in_range_and_deterministic(tiny_tokenizer):
    a = wl.summarization_workload(tiny_tokenizer, 12, 100, 300, max_tokens=16, seed=1)
    b = wl.summarization_workload(tiny_tokenizer, 12, 100, 300, max_tokens=16, seed=1)
    c = wl.summarization_workload(tiny_tokenizer, 12, 100, 300, max_tokens=16, seed=2)
    lens = [len(p) for p in a.prompts]
    assert len(lens) == 12 and all(100 <= n <= 300 for n in lens)
    assert len(set(lens)) > 3  # mixed lengths
    assert a.prompts == b.prompts and a.prompts != c.prompts
    assert a.max_tokens == 16 and not a.ignore_eos
    text = tiny_tokenizer.decode(a.prompts[0])
    assert text.startswith("<|im_start|>user\nSummarize") and text.endswith("<|im_start|>assistant\n")


def test_summarization_rejects_bad_range(tiny_tokenizer):
    with pytest.raises(ValueError):
        wl.summarization_workload(tiny_tokenizer, 2, 300, 100)


def test_fixed_length(tiny_tokenizer):
    w = wl.fixed_length_workload(tiny_tokenizer, 5, 64, output_len=8, seed=0)
    assert all(abs(len(p) - 64) <= 2 for p in w.prompts)
    assert w.ignore_eos and w.max_tokens == 8


def test_dataset_jsonl_chat_modes(tiny_tokenizer, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": t}) for t in ["first text", "second one", "third"]) + "\n")
    raw = wl.dataset_workload(tiny_tokenizer, path, "body", chat=None, num_prompts=2)
    assert len(raw.prompts) == 2 and raw.prompts[0] == tiny_tokenizer("first text")["input_ids"]
    as_is = wl.dataset_workload(tiny_tokenizer, path, "body", chat="raw")
    assert tiny_tokenizer.decode(as_is.prompts[2]) == "<|im_start|>user\nthird<|im_end|>\n<|im_start|>assistant\n"
    summ = wl.dataset_workload(tiny_tokenizer, path, "body", chat="summarize", output_len=4)
    assert "Summarize" in tiny_tokenizer.decode(summ.prompts[0]) and summ.ignore_eos and summ.max_tokens == 4
    with pytest.raises(KeyError, match="no column 'text'"):
        wl.read_texts(path)
    with pytest.raises(FileNotFoundError):
        wl.read_texts(tmp_path / "missing.jsonl")


def test_rewrite_task_wraps_the_same_passages(tiny_tokenizer):
    a = wl.summarization_workload(tiny_tokenizer, 4, 100, 300, max_tokens=16, seed=1, task="rewrite")
    assert tiny_tokenizer.decode(a.prompts[0]).startswith("<|im_start|>user\nRewrite")
    assert "4 chat rewrite prompts" in a.description
    with pytest.raises(ValueError, match="task must be one of summarize, rewrite"):
        wl.summarization_workload(tiny_tokenizer, 2, 100, 300, task="extract")
