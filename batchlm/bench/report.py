"""Rows of benchmark results, printed as a plain-text table or written as JSON.

Contract: a `Row` is one engine configuration's measured run (requests,
prompt and output tokens, wall seconds, optional note); `format_table`
renders rows with derived rates; `write_json` writes any JSON-able dict
(parent directories created). No torch, no engine.
"""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict, dataclass
from pathlib import Path


class OutputRates:
    """For a baseline's run record with `token_ids` (per request) and `wall_s`."""

    token_ids: list[list[int]]
    wall_s: float

    @property
    def num_output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s


@dataclass(frozen=True)
class Row:
    name: str
    requests: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    note: str = ""
    roofline_fraction: float | None = None

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def input_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(requests_per_s=self.requests_per_s, input_tokens_per_s=self.input_tokens_per_s,
                 output_tokens_per_s=self.output_tokens_per_s)
        return d


_COLUMNS = ("engine", "requests", "req/s", "input tok/s", "output tok/s", "output tok",
            "wall s", "roofline", "note")


def format_table(rows: list[Row]) -> str:
    cells = [_COLUMNS]
    for r in rows:
        roof = "" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.1f}%"
        cells.append((r.name, str(r.requests), f"{r.requests_per_s:.3f}", f"{r.input_tokens_per_s:.1f}",
                      f"{r.output_tokens_per_s:.1f}", str(r.output_tokens), f"{r.wall_s:.2f}", roof, r.note))
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = []
    for k, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i in (0, 8) else v.rjust(w)
                               for i, (v, w) in enumerate(zip(c, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, for copying into the README."""
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m batchlm"] + [shlex.quote(a) for a in argv])


def write_json(path: str | Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
