"""batchlm.kernels: attention (and later other) kernels behind one dispatch.

Each kernel has a PyTorch reference (runs anywhere) and, where written, a
Triton implementation for GPUs. kernels/dispatch.py (`get_attention_backend`,
`get_layer_kernels`, under one `attention_backend` switch) is the one place
that picks which implementation runs.
"""
from batchlm.kernels.attention import AttentionMetadata, TorchPagedAttention
from batchlm.kernels.dispatch import get_attention_backend, get_layer_kernels

__all__ = ["AttentionMetadata", "TorchPagedAttention", "get_attention_backend", "get_layer_kernels"]
