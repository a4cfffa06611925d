"""The installed S3 stack is the one users get: s3fs of the aiobotocore
generation (pip once backtracked to s3fs 0.4.2 of 2019 when moto[server]
pulled a newer botocore), with the lower bounds in pyproject.toml that
prevent it."""
from __future__ import annotations

import importlib.metadata as md
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from .helpers import REPO


def test_s3fs_is_the_aiobotocore_generation():
    import s3fs.core

    assert Version(md.version("s3fs")) >= Version("2024.1"), md.version("s3fs")
    assert hasattr(s3fs.core, "aiobotocore"), "s3fs without aiobotocore: a pre-2021 release is installed"
    assert Version(md.version("fsspec")) == Version(md.version("s3fs")), "fsspec and s3fs are released together"


def test_pyproject_bounds_keep_the_resolver_off_old_s3fs():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = {Requirement(r).name: Requirement(r) for r in project["optional-dependencies"]["pipeline"]}
    for name in ("s3fs", "fsspec"):
        assert not reqs[name].specifier.contains("0.4.2"), f"{name} must have a lower bound"
        assert reqs[name].specifier.contains(md.version(name))
