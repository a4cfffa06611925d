"""The one place that picks a kernel implementation for a device."""
from __future__ import annotations

import torch

from batchlm.kernels.attention import TorchPagedAttention


def get_attention_backend(device: torch.device | str, name: str | None = None):
    """Return the paged-attention backend for `device`.

    name: None/"auto" picks the best available; "torch" forces the PyTorch
    reference. Triton backends register here once written (separate issue).
    """
    name = name or "auto"
    if name not in ("auto", "torch"):
        raise ValueError(f"attention backend must be 'auto' or 'torch', got {name!r}")
    return TorchPagedAttention()
