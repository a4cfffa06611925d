"""Where bytes live: a local directory or an object store, behind fsspec.

Contract
--------
- `Store(path, storage_options)` resolves the filesystem (local paths, s3://,
  anything fsspec knows) once; `storage_options` go to the filesystem as-is.
- `write_atomic(name, data)`: the object `name` under the root appears whole
  or not at all. Local: written to `.tmp-<name>-<random>` in the same
  directory, flushed, fsynced, `os.replace`d, and the directory fsynced.
  Object stores: one PUT of the whole object (never multipart, never a
  temporary object), which is atomic by the store's own guarantee.
- Fault injection for tests: `BATCHLM_FAILPOINTS="shard_write=SECONDS"` makes
  a local shard write pause halfway through its temporary file, so a test can
  kill the process mid-write deterministically. Unset, it costs one dict lookup.
- `clean_temp()` removes the temporary files a killed writer left behind
  (they only exist on local disk).
- Errors reaching the store (missing bucket, unreachable endpoint, refused
  credentials) surface as ConfigError through `store_errors(what)`.
"""
from __future__ import annotations

import contextlib
import os
import time
import uuid

from batchlm.pipelines.errors import ConfigError

TMP_PREFIX = ".tmp-"
_SINGLE_PUT_LIMIT = 5 * 2**30  # S3's limit for one PUT


def _failpoint(name: str) -> float:
    spec = os.environ.get("BATCHLM_FAILPOINTS")
    if not spec:
        return 0.0
    points = dict(p.split("=", 1) for p in spec.split(",") if "=" in p)
    return float(points.get(name, 0.0))


def make_fs(path: str, storage_options: dict | None):
    """(fsspec filesystem, path inside it) for a URL or local path."""
    import fsspec.core

    opts = dict(storage_options or {})
    if path.startswith("s3://"):
        # Fail fast on an unreachable endpoint instead of retrying for minutes.
        cfg = dict(opts.pop("config_kwargs", {}) or {})
        cfg.setdefault("connect_timeout", 5)
        cfg.setdefault("retries", {"max_attempts": 2})
        opts["config_kwargs"] = cfg
    try:
        return fsspec.core.url_to_fs(path, **opts)
    except (ImportError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot open {path}: {e}") from None


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@contextlib.contextmanager
def store_errors(what: str):
    """Turn storage exceptions into one clear ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except FileNotFoundError as e:
        raise ConfigError(f"{what}: not found: {e.filename or e}") from None
    except PermissionError as e:
        raise ConfigError(f"{what}: permission denied: {e}") from None
    except Exception as e:  # botocore/aiohttp errors have no common base worth importing
        name = type(e).__name__
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                    "ConnectionRefusedError", "NoCredentialsError", "ClientError", "OSError",
                    "ServerDisconnectedError", "ReadTimeoutError") or isinstance(e, OSError):
            raise ConfigError(f"{what}: {name}: {e}") from None
        raise


class Store:
    """An output (or input) root: list, read and atomically write objects by name."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.url = path.rstrip("/")
        self.fs, self.root = make_fs(self.url, storage_options)
        self.root = self.root.rstrip("/")
        self.local = is_local(self.fs)

    def _p(self, name: str) -> str:
        return f"{self.root}/{name}"

    def where(self, name: str = "") -> str:
        return f"{self.url}/{name}" if name else self.url

    def ensure_root(self) -> None:
        with store_errors(f"output {self.url}"):
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            else:
                self.fs.ls(self.root.split("/")[0])  # the bucket must exist and be reachable

    def list(self) -> list[str]:
        """Names directly under the root (empty if the root does not exist)."""
        with store_errors(f"output {self.url}"):
            try:
                self.fs.invalidate_cache(self.root)
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def read(self, name: str) -> bytes:
        with store_errors(f"output {self.url}"):
            return self.fs.cat_file(self._p(name))

    def delete(self, name: str) -> None:
        self.fs.rm(self._p(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        if not self.local:
            # NOTE: a single PUT: the object appears whole or not at all.
            assert len(data) < _SINGLE_PUT_LIMIT, "a shard must stay under 5 GiB"
            self.fs.pipe_file(self._p(name), data, chunksize=_SINGLE_PUT_LIMIT)
            return
        tmp = self._p(f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            pause = _failpoint("shard_write") if name.startswith("part-") else 0.0
            if pause:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(pause)
                data = data[len(data) // 2:]
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._p(name))
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def clean_temp(self) -> int:
        """Remove temporary files left by a killed writer; returns how many."""
        stale = [n for n in self.list() if n.startswith(TMP_PREFIX)]
        for n in stale:
            self.delete(n)
        return len(stale)
