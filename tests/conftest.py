"""Settings the whole test process needs before any library is imported.

Triton fixes its interpreter mode when triton is first imported, and
transformers' model modules import triton, so the mode that the Triton
interpreter tests need (tests/kernels/interpreter) is set here, before any
test module is collected. Only without CUDA: on a GPU machine Triton must
compile for the device, and the interpreter tests are skipped there (their
conftest says so); the ahead-of-time compile test always runs in a fresh
process without the variable (tests/kernels/test_triton_compile.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
