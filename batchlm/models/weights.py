"""Reading checkpoint tensors from an HF-format directory: safetensors only.

Contract
--------
`safetensors_files(model_dir) -> list[Path]`: the single `model.safetensors`,
or the shards named by `model.safetensors.index.json`, or else every
`*.safetensors` in the directory. A directory that holds only pickle weights
(`*.bin`, `*.pt`, `*.pth`) raises ValueError ("pickle weights are not
supported, convert to safetensors"); one with no weights at all raises
FileNotFoundError. Pickle files are never opened.

`iter_weights(files) -> Iterator[(hf_name, tensor)]`: one CPU tensor at a time,
in its stored dtype, so peak host memory stays about one tensor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
INDEX_NAME = "model.safetensors.index.json"


def safetensors_files(model_dir: Path) -> list[Path]:
    model_dir = Path(model_dir)
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"unreadable safetensors index {index}: {e}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"shards named in {index} are missing: {', '.join(absent)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{model_dir} holds only pickle weights ({', '.join(pickles[:4])}): pickle "
            "weights are not supported, convert to safetensors")
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"cannot read safetensors file {path}: {e}") from e
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
