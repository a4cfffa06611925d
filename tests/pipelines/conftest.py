"""Fixtures for pipeline tests: a tiny random model directory (fast engine
start, real batchlm engine) and a Ray shared by the in-process tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    from tests.engine.helpers import tiny_model_dir

    d, _ = tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), LlamaConfig, max_position_embeddings=512)
    return d


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for all in-process run_job calls (run_job reuses it)."""

    import ray

    from batchlm.pipelines.config import parse_config
    from batchlm.pipelines.runner import init_ray

    init_ray(parse_config({"input": {"format": "jsonl", "path": "x"}, "task": {"prompt": "x"},
                           "output": {"path": "x"}}))
    yield
    ray.shutdown()


def pytest_configure(config):
    config.addinivalue_line("markers", "ray_cluster: starts Ray processes (a minute or more); runs by default")
