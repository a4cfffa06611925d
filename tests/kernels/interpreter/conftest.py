"""Triton's interpreter for this directory's tests: TRITON_INTERPRET must be
in the environment before the process imports triton (the mode is fixed at
that import). tests/conftest.py sets it for the whole test process on
machines without CUDA; here it is set again for a run of this directory
alone, and where triton was already imported in compiled mode (a GPU
machine) the tests are skipped with the reason, never run half-configured."""
import os
import sys

import pytest

_COMPILED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not _COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if not _COMPILED:
        return
    here = os.path.dirname(__file__)
    skip = pytest.mark.skip(reason="triton was imported in compiled mode (CUDA present): run "
                                   "TRITON_INTERPRET=1 python -m pytest tests/kernels/interpreter in its own process")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
