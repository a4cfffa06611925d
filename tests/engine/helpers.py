"""Tiny random models (saved as real HF directories, with a byte-level
tokenizer) for engine tests, and the transformers reference to compare with."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tests.models.helpers import tiny_hf_model

EOS = 256
BOS = 257  # only in bos_tokenizer()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte-level tokens plus <eos> (id 256): every string round-trips."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    vocab["<eos>"] = EOS
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer that adds <bos> (id 257) in front of every encoded text, as Llama 3 and
    Mistral tokenizers do, with a chat template that writes the BOS itself (like Llama 3's)."""
    tok = byte_tokenizer()
    tk = tok.backend_tokenizer
    tk.add_special_tokens(["<bos>"])
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                      special_tokens=[("<bos>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>")
    tok.chat_template = "{{ bos_token }}" + byte_tokenizer().chat_template
    return tok


def tiny_model_dir(tmp_path, config_cls, seed: int = 0, tokenizer=None, **overrides):
    """Save a tiny random model + tokenizer (default: the byte tokenizer) to tmp_path; return
    (dir, hf_model)."""
    overrides.setdefault("vocab_size", 260)
    overrides.setdefault("max_position_embeddings", 512)
    overrides.setdefault("eos_token_id", EOS)
    overrides.setdefault("bos_token_id", None)
    overrides.setdefault("pad_token_id", None)
    model = tiny_hf_model(config_cls, seed=seed, **overrides)
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = EOS
    model.save_pretrained(tmp_path, safe_serialization=True)
    (tokenizer or byte_tokenizer()).save_pretrained(tmp_path)
    return str(tmp_path), model


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Transformers' greedy generate, one prompt at a time (no padding effects);
    returns new tokens up to and including EOS."""
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
        new = y[0, len(ids):].tolist()
        if EOS in new:
            new = new[:new.index(EOS) + 1]
        outs.append(new)
    return outs
