"""Benchmarks: `python -m batchlm bench throughput|classify`.

Map: cli.py (argument parsing, the only module imported at CLI start-up),
workload.py (prompt token ids from pydoc text or a dataset file),
roofline.py (matmul rate and FLOP counting), hf_baseline.py (transformers
generate), throughput.py and classify.py (the two commands), report.py
(tables and JSON).
"""
