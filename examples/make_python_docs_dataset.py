"""Build examples/data/python_docs.{parquet,jsonl}: 200 rows of real English text.

Source: the help topics of Python's own documentation, shipped with every
CPython interpreter as `pydoc_data.topics.topics` (Python Software Foundation
License Version 2; see examples/data/SOURCE.md). No network is needed.

Each row: `id` (doc-NNN), `topic` (the pydoc topic key), `text` (a passage
of that topic: consecutive paragraphs joined until 100-300 words, whitespace
normalised, reST underlines dropped). Rows are in topic order and
deterministic for a given Python version; the committed files were made with
Python 3.11.

    python examples/make_python_docs_dataset.py [--rows 200] [--out examples/data]
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MIN_WORDS, MAX_WORDS = 100, 300


def passages(text: str):
    """Split one topic into passages of MIN_WORDS..MAX_WORDS words."""
    paras = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", text)]
    paras = [p for p in paras if p and not re.fullmatch(r"[*=\-~^]+", p)]
    chunk: list[str] = []
    for para in paras:
        words = para.split(" ")[:MAX_WORDS]
        if chunk and len(chunk) + len(words) > MAX_WORDS:
            if len(chunk) >= MIN_WORDS:
                yield " ".join(chunk)
            chunk = []
        chunk += words
    if len(chunk) >= MIN_WORDS:
        yield " ".join(chunk)


def build_rows(n: int) -> list[dict]:
    from pydoc_data.topics import topics

    rows = []
    for key in sorted(topics):
        for text in passages(topics[key]):
            rows.append({"id": f"doc-{len(rows):03d}", "topic": key, "text": text})
            if len(rows) == n:
                return rows
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = build_rows(args.rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "python_docs.parquet")
    with open(out / "python_docs.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(rows)} rows to {out}/python_docs.{{parquet,jsonl}}")


if __name__ == "__main__":
    main()
