"""`bench throughput --step-phases`: where the time of an engine step goes.

Contract
--------
`StepPhases(engine)` wraps, on that engine's own objects (nothing global),
each phase of `LLMEngine.step`: scheduling, the model run (graph staging and
input preparation inside it), the logits, the scheduler's bookkeeping after
the step, sampling with the stop checks, and the whole step. On CUDA it
synchronizes after the model run and after the logits, so each phase holds
the device time of the work it launched (that changes the timing a little:
nothing overlaps). `report()` gives per-phase totals, calls and ms per call
since the last `reset()`; `remove()` puts the engine back as it was.

The figures say which host work a step waits on; they are not the step's
speed (for that, the plain run beside it).
"""
from __future__ import annotations

import time
from collections import Counter

import torch

# (attribute of the engine holding the object, method, label); None: the engine itself
PHASES = (
    ("scheduler", "schedule", "schedule"),
    ("runner", "run", "model run"),
    ("runner", "_graph_step", "  CUDA graph staging + replay"),
    ("runner", "_prepare", "  inputs for an eager run"),
    ("runner", "logits", "logits"),
    ("scheduler", "update_after_step", "bookkeeping after the step"),
    (None, "_sample", "sampling + stop checks"),
    (None, "step", "whole step"),
)
SYNC_AFTER = {"model run", "logits"}


class StepPhases:
    def __init__(self, engine):
        self.engine = engine
        self.total: Counter = Counter()
        self.calls: Counter = Counter()
        self._sync = engine.device.type == "cuda"
        self._wrapped = []
        for owner_name, method, label in PHASES:
            owner = engine if owner_name is None else getattr(engine, owner_name)
            if hasattr(owner, method):
                self._wrap(owner, method, label)

    def _wrap(self, owner, method: str, label: str) -> None:
        inner = getattr(owner, method)
        sync = self._sync and label in SYNC_AFTER
        total, calls = self.total, self.calls

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = inner(*args, **kwargs)
            if sync:
                torch.cuda.synchronize()
            total[label] += time.perf_counter() - t0
            calls[label] += 1
            return out

        self._wrapped.append((owner, method, vars(owner).get(method)))  # what to put back
        setattr(owner, method, timed)  # an instance attribute, shadowing the class's method

    def reset(self) -> None:
        self.total.clear()
        self.calls.clear()

    def remove(self) -> None:
        for owner, method, before in reversed(self._wrapped):
            if before is None:
                delattr(owner, method)
            else:
                setattr(owner, method, before)
        self._wrapped = []

    def report(self) -> str:
        lines = [f"{'phase':32} {'total ms':>10} {'calls':>6} {'ms/call':>8}"]
        for _, _, label in PHASES:
            if self.calls[label]:
                t, n = self.total[label], self.calls[label]
                lines.append(f"{label:32} {t * 1e3:10.1f} {n:6d} {t / n * 1e3:8.3f}")
        whole = self.total["whole step"]
        named = sum(self.total[label] for _, _, label in PHASES
                    if label not in ("whole step",) and not label.startswith("  "))
        if self.calls["whole step"]:
            lines.append(f"{'rest of the step':32} {(whole - named) * 1e3:10.1f}")
        return "\n".join(lines)
