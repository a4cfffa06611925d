"""Triton's interpreter for this directory's tests: TRITON_INTERPRET must be
in the environment before the process imports triton (the mode is fixed at
that import), so it is set here, at collection, before any test runs."""
import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("triton was imported before tests/kernels/interpreter/ was collected, without "
                       "TRITON_INTERPRET=1: run these tests in their own process or set it in the environment")
os.environ["TRITON_INTERPRET"] = "1"
