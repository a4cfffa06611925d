"""`bench classify`: label scoring behind a shared instruction, prefix caching on vs off.

Contract: `classification_prompts(tokenizer, n, seed)` returns n chat-formatted
prompts (strings) that share one labeling instruction of about 300 tokens and
differ only in a short sentence from the Python docs, plus the label list.
`run(args)` scores them with `LLM.classify(prompts, labels)` in two LLM
instances of the same process, prefix caching on and off (same data, same
order, a tiny unrelated warm-up first, model load excluded), and prints
rows/s for each, the speed-up, and how many predicted labels agree.
"""
from __future__ import annotations

import gc
import random
import re
import time

from batchlm.bench.report import command_line, write_json

LABELS = ["syntax", "objects", "errors", "modules"]

INSTRUCTION = """You are annotating sentences taken from the Python language documentation. \
Your annotations will be used to build a search index, so be consistent and precise.

Read the sentence at the end of this message and assign it exactly one of the following \
four categories. Answer with the category name only, in lower case, with no punctuation \
and no explanation.

syntax: the sentence is about the grammar of the language: how statements and \
expressions are written, keywords, operators and their precedence, literals, indentation, \
function and class definitions, comprehensions, or what is valid source code.

objects: the sentence is about the data model: objects, values and types, identity, \
attributes, special methods such as __init__ or __eq__, classes and instances, \
inheritance, or how built-in types behave at run time.

errors: the sentence is about things going wrong: exceptions and how they are raised, \
caught or propagated, the try, except and raise statements, warnings, or behaviour \
that is not allowed.

modules: the sentence is about how code is organised and run: modules and packages, the \
import system, namespaces and scopes, global and nonlocal names, the interpreter, the \
standard library, the execution model, or the environment a program runs in.

If a sentence touches more than one category, choose the one that is its main subject. \
If none fits well, choose the closest one; never invent a new category.

Example: "Every object has an identity, a type and a value." -> objects"""


def pydoc_sentences() -> list[str]:
    """Prose sentences from the interpreter's own docs, in a fixed order."""
    from batchlm.bench.workload import pydoc_paragraphs

    out = []
    for para in pydoc_paragraphs():
        if para.startswith((" ", ">>>")):
            continue
        for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
            if 40 <= len(s) <= 200 and s[0].isupper():
                out.append(s)
    return out


def classification_prompts(tokenizer, num_rows: int, seed: int = 0) -> tuple[list[str], list[str]]:
    sentences = pydoc_sentences()
    rows = random.Random(seed).sample(sentences, min(num_rows, len(sentences)))
    prompts = [tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{INSTRUCTION}\n\nSentence: {s}"}],
        tokenize=False, add_generation_prompt=True) for s in rows]
    return prompts, list(LABELS)


def _time_classify(llm, prompts, labels, repeats: int):
    llm.classify(["Hello there, how are you today?"], labels, use_tqdm=False)  # warm-up, unrelated prefix
    runs = []
    for _ in range(max(1, repeats)):
        if hasattr(llm, "reset_prefix_cache"):
            llm.reset_prefix_cache()
        t0 = time.perf_counter()
        outs = llm.classify(prompts, labels, use_tqdm=False)
        runs.append((time.perf_counter() - t0, outs))
    runs.sort(key=lambda r: r[0])
    return runs[len(runs) // 2]


def run(args) -> int:
    from transformers import AutoTokenizer

    from batchlm import LLM

    settings = [s for s in ("on", "off") if args.only in (None, s)]
    results, tokenizer, prompts, labels = {}, None, None, None
    for setting in settings:
        llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens,
                  enable_prefix_caching=setting == "on", kv_cache_memory=args.kv_cache_memory,
                  seed=args.seed, compile_model=args.compile, quantization=args.quantization,
                  kv_cache_dtype=args.kv_cache_dtype or "auto")
        if prompts is None:
            tokenizer = AutoTokenizer.from_pretrained(str(llm.model_dir))
            prompts, labels = classification_prompts(tokenizer, args.num_rows, args.seed)
        print(f"[bench] classify {len(prompts)} rows, prefix caching {setting} ...", flush=True)
        wall, outs = _time_classify(llm, prompts, labels, args.repeats)
        results[setting] = (wall, [o.label for o in outs], sum(1 for o in outs if o.error))
        del llm, outs
        gc.collect()

    shared = len(tokenizer(INSTRUCTION, add_special_tokens=False)["input_ids"])
    lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    print(f"\ncommand:  {command_line(args.argv)}")
    print(f"workload: {len(prompts)} rows, shared instruction {shared} tokens, prompts "
          f"{min(lens)}-{max(lens)} tokens ({sum(lens)} in all), {len(labels)} labels {labels}\n")
    data = {"command": command_line(args.argv), "model": args.model, "rows": len(prompts),
            "instruction_tokens": shared, "prompt_tokens": sum(lens), "labels": labels}
    for setting, (wall, _, errors) in results.items():
        rate = len(prompts) / wall
        data[f"prefix_caching_{setting}"] = {"wall_s": wall, "rows_per_s": rate, "errors": errors}
        print(f"prefix caching {setting:3s}: {rate:8.2f} rows/s  ({wall:.2f} s"
              + (f", {errors} errors)" if errors else ")"))
    if len(results) == 2:
        data["speedup"] = results["off"][0] / results["on"][0]
        agree = sum(a == b for a, b in zip(results["on"][1], results["off"][1]))
        data["labels_agree"] = agree
        print(f"speed-up (on / off): {data['speedup']:.2f}x; same predicted label: {agree}/{len(prompts)}")
        counts = {lab: results["on"][1].count(lab) for lab in labels}
        print(f"predicted labels (caching on): {counts}")
    if args.json:
        write_json(args.json, data)
        print(f"\nwrote {args.json}")
    return 0
