"""Benchmarks: `python -m batchlm bench throughput|classify|quality`.

Map: cli.py (argument parsing, the only module imported at CLI start-up),
workload.py (prompt token ids from pydoc text or a dataset file),
roofline.py (matmul rate in a given dtype and FLOP counting), hf_baseline.py
(transformers generate), throughput.py, classify.py and quality.py (the
commands; quality.py also owns the precision-config syntax that throughput's
--compare shares), report.py (tables and JSON), data/ (bench quality's text
and its SOURCE.md).
"""
