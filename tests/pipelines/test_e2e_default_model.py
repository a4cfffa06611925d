"""End to end with the real default model on the quickstart data: the shipped
configs, trimmed by --set to a few rows and tokens so the test stays short."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from .helpers import REPO, cli, read_output

ROWS = 24


@pytest.mark.slow
@pytest.mark.parametrize("config", ["quickstart", "classify"])
def test_shipped_config_end_to_end(tmp_path, config):
    out = tmp_path / config
    p = cli("run", REPO / "configs" / f"{config}.yaml", "--set", f"input.limit={ROWS}",
            "--set", "sampling.max_tokens=8", "--set", f"output.path={out}",
            "--set", "output.rows_per_shard=8", timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "batchlm run: complete" in p.stderr
    table = read_output(str(out))
    src = pq.read_table(REPO / "examples/data/python_docs.parquet").slice(0, ROWS)
    assert table.num_rows == ROWS
    assert sorted(table["id"].to_pylist()) == sorted(src["id"].to_pylist())  # each id exactly once
    assert table["error"].null_count == ROWS, table.filter(table["error"].is_valid())["error"].to_pylist()
    rows = table.to_pylist()
    by_id = {r["id"]: r for r in src.to_pylist()}
    assert all(r["topic"] == by_id[r["id"]]["topic"] for r in rows)  # carried column
    assert all(r["num_input_tokens"] > 0 for r in rows)
    if config == "quickstart":
        assert all(r["generated_text"].strip() for r in rows)
        assert all(0 < r["num_output_tokens"] <= 8 for r in rows)
    else:
        labels = {"syntax", "data model", "runtime"}
        assert all(r["label"] in labels for r in rows)
        assert all(abs(sum(r["label_probs"].values()) - 1) < 1e-4 for r in rows)
        assert all(r["label"] == max(r["label_probs"], key=r["label_probs"].get) for r in rows)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert sum(u["rows"] for u in manifest["units"].values()) == ROWS and (out / "_SUCCESS").exists()
    status = cli("status", out)
    assert status.returncode == 0 and "complete" in status.stdout and f"{ROWS}/{ROWS}" in status.stdout
