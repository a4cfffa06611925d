"""GGUF files, converted once into a cached HF-format directory.

Contract
--------
`gguf_to_hf_dir(path, weights=True) -> Path`: returns a directory holding
`config.json`, `model.safetensors` (dequantized weights, as transformers
dequantizes them, float32) and the tokenizer files (chat template included), converting the
GGUF on first use through transformers (`from_pretrained(..., gguf_file=)`,
~20-40 s for a 135M model on 2 cores). Later calls return the cached directory
at once. `weights=False` (quantized loading reads the weights from the GGUF
itself, batchlm.models.gguf_weights): a full directory if one is cached, else
`<stem>-<hash>-noweights` with config and tokenizer only, which never builds
the dequantized model.

Cache: `$BATCHLM_CACHE_DIR/models/` or `~/.cache/batchlm/models/`, one
directory `<stem>-<hash of size and mtime>`. It is written to a temporary
sibling and renamed into place, so a directory that exists is complete; two
processes converting at once both succeed and one result is kept.

A path that is not a readable GGUF file raises FileNotFoundError/ValueError
naming it. trust_remote_code is never used.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from batchlm.kernels import cpu_native

log = logging.getLogger(__name__)

CACHE_LAYOUT_VERSION = "1"


def cache_root() -> Path:
    return cpu_native.cache_root() / "models"


def check_gguf(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (bad magic {magic!r})")


def cache_dir_for(path: Path) -> Path:
    st = path.stat()
    key = f"{CACHE_LAYOUT_VERSION}:{path.name}:{st.st_size}:{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / f"{path.stem}-{digest}"


def gguf_to_hf_dir(path: str | os.PathLike, weights: bool = True) -> Path:
    path = Path(path).expanduser().resolve()
    check_gguf(path)
    final = cache_dir_for(path)
    if (final / "config.json").is_file():
        return final
    if not weights:  # config and tokenizer only: the weights are read from the GGUF itself
        final = final.with_name(final.name + "-noweights")
        if (final / "config.json").is_file():
            return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        log.info("converting %s into %s (once)", path, final)
        _convert(path, tmp, weights)
        _make_shareable(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process won the race
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _make_shareable(directory: Path) -> None:
    """mkdtemp makes 0700; give the cache the permissions of an ordinary mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _convert(path: Path, out: Path, weights: bool = True) -> None:
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    src, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(src, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32) \
            if weights else None
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"cannot convert GGUF file {path}: {e}") from e
    if model is not None:
        state = model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # safetensors refuses shared tensors
        state = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config.architectures = [type(model).__name__]
        generation = model.generation_config
    else:
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")]
        generation = GenerationConfig.from_model_config(config)
    config.dtype = torch.float32
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    try:
        generation.save_pretrained(out)
    except Exception as e:  # optional; eos ids also live in config.json
        log.warning("could not save generation_config for %s: %s", path, e)
