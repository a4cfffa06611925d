"""Where bytes live: a local directory or an object store, behind fsspec.

Contract
--------
- `Store(path, storage_options)` resolves the filesystem (local paths, s3://,
  anything fsspec knows) once; `storage_options` go to the filesystem as-is.
- Local paths are made absolute (`~` expanded) when the Store is built, so
  every message names the real place; `url` is what is printed.
- `write_atomic(name, data) -> Written` (size, sha256 of the bytes, the
  object store's ETag): the object `name` under the root appears whole
  or not at all. Local: written to `.batchlm-tmp-<name>-<random>` in the same
  directory, flushed, fsynced, `os.replace`d, and the directory fsynced.
  Object stores: one PUT of the whole object (never multipart, never a
  temporary object), which is atomic by the store's own guarantee.
- `create_exclusive(name, data) -> bool`: writes only if `name` does not
  exist (local O_EXCL; S3 `If-None-Match: *`), False when it already did.
- `entries() -> {name: Entry(size, etag)}`: one listing, no reads.
- `move_aside(name) -> str`: moves an object under `_damaged/` (never deletes).
- Fault injection for tests: `BATCHLM_FAILPOINTS="shard_write=SECONDS"` makes
  a local shard write pause halfway through its temporary file, so a test can
  kill the process mid-write deterministically. Unset, it costs one dict lookup.
- `clean_temp()` removes the temporary files a killed writer left behind
  (they only exist on local disk). Only names with batchlm's own prefix
  `.batchlm-tmp-` are touched, so no file of the user's can match.
- Errors reaching the store (missing bucket, unreachable endpoint, refused
  credentials) surface as ConfigError through `store_errors(what)`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import time
import uuid
from dataclasses import dataclass

from batchlm.pipelines.errors import ConfigError

TMP_PREFIX = ".batchlm-tmp-"
DAMAGED_DIR = "_damaged"
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
        # NOTE: transient faults are retried with backoff: botocore's standard mode, 4 attempts in all
        # (5xx, throttling, dropped connections, a reply stalled past read_timeout), and s3fs's own loop
        # (5 attempts, fixed) again around it for dropped connections and timeouts. Connection refused
        # is retried by botocore alone, so an unreachable endpoint still fails in seconds. A retried
        # conditional PUT may answer 412 after its first attempt went through: Lease.acquire knows.
        cfg = dict(opts.pop("config_kwargs", {}) or {})
        cfg.setdefault("connect_timeout", 5)
        cfg.setdefault("read_timeout", 20)
        cfg.setdefault("retries", {"total_max_attempts": 4, "mode": "standard"})
        opts["config_kwargs"] = cfg
    try:
        return fsspec.core.url_to_fs(path, **opts)
    except (ImportError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot open {path}: {e}") from None


def normalize_path(path: str) -> str:
    """A URL stays as given (without a trailing slash); a local path becomes absolute."""
    if "://" in path and not path.startswith("file://"):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path.removeprefix("file://")))


def glob_root(path: str) -> str:
    """The path itself, or for a glob the directory its pattern starts in ("d/x/*.parquet" -> "d/x")."""
    cut = min((path.find(c) for c in "*?[" if c in path), default=-1)
    return path if cut < 0 else path[:cut].rsplit("/", 1)[0]


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


@contextlib.contextmanager
def store_errors(what: str):
    """Turn storage exceptions into one clear ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ConfigError(f"{what}: a storage option is not one the filesystem accepts ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: not UTF-8 text: {e.reason} at byte {e.start}") from None
    except FileNotFoundError as e:
        raise ConfigError(f"{what}: not found: {e.filename or e}") from None
    except PermissionError as e:
        raise ConfigError(f"{what}: permission denied: {e}") from None
    except Exception as e:  # botocore/aiohttp errors have no common base worth importing
        name = type(e).__name__
        if name == "ArrowInvalid":  # e.g. a JSON Lines file read as Parquet
            raise ConfigError(f"{what}: cannot be read: {e}") from None
        if name in ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                    "ConnectionRefusedError", "NoCredentialsError", "ClientError", "OSError",
                    "ServerDisconnectedError", "ReadTimeoutError") or isinstance(e, OSError):
            raise ConfigError(f"{what}: {name}: {e}") from None
        raise


@dataclass(frozen=True)
class Written:
    """What a write_atomic produced: recorded at commit time, checked on resume."""
    size: int
    sha256: str
    etag: str = ""  # object stores only


@dataclass(frozen=True)
class Entry:
    """One listed object, as the listing reports it (no read)."""
    size: int
    etag: str = ""


class Store:
    """An output (or input) root: list, read and atomically write objects by name."""

    def __init__(self, path: str, storage_options: dict | None = None):
        self.url = normalize_path(path)
        self.fs, self.root = make_fs(self.url, storage_options)
        self.local = is_local(self.fs)
        self.root = self.root if self.local and self.root == "/" else self.root.rstrip("/")

    def _p(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def where(self, name: str = "") -> str:
        return f"{self.url.rstrip('/')}/{name}" if name else self.url

    def ensure_root(self) -> None:
        with store_errors(f"output {self.url}"):
            if self.local:
                os.makedirs(self.root, exist_ok=True)
            else:
                self.fs.ls(self.root.split("/")[0])  # the bucket must exist and be reachable

    def entries(self) -> dict[str, Entry]:
        """Objects directly under the root, with sizes and ETags (empty if the root does not exist)."""
        with store_errors(f"output {self.url}"):
            try:
                self.fs.invalidate_cache(self.root)
                listed = self.fs.ls(self.root, detail=True)
            except FileNotFoundError:
                return {}
        out = {}
        for e in listed:
            name = e["name"].rstrip("/").rsplit("/", 1)[-1]
            etag = str(e.get("ETag") or e.get("etag") or "").strip('"')
            out[name] = Entry(int(e.get("size") or 0), etag)
        return dict(sorted(out.items()))

    def list(self) -> list[str]:
        """Names directly under the root (empty if the root does not exist)."""
        return list(self.entries())

    def read(self, name: str) -> bytes:
        with store_errors(f"output {self.url}"):
            return self.fs.cat_file(self._p(name))

    def open(self, name: str):
        return self.fs.open(self._p(name), "rb")

    def delete(self, name: str) -> None:
        with store_errors(f"output {self.url}"):
            self.fs.rm(self._p(name))

    def move_aside(self, name: str) -> str:
        """Moves `name` to `_damaged/<name>.<time>` (kept for inspection); returns the new name."""
        dest = f"{DAMAGED_DIR}/{name}.{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        with store_errors(f"output {self.url}"):
            if self.local:
                os.makedirs(self._p(DAMAGED_DIR), exist_ok=True)
                os.replace(self._p(name), self._p(dest))
            else:
                self.fs.mv(self._p(name), self._p(dest))
        return dest

    def write_atomic(self, name: str, data: bytes) -> Written:
        digest = hashlib.sha256(data).hexdigest()
        if not self.local:
            # NOTE: a single PUT: the object appears whole or not at all.
            assert len(data) < _SINGLE_PUT_LIMIT, "a shard must stay under 5 GiB"
            with store_errors(f"output {self.url}"):
                resp = self.fs.pipe_file(self._p(name), data, chunksize=_SINGLE_PUT_LIMIT)
            etag = str((resp or {}).get("ETag", "")).strip('"') if isinstance(resp, dict) else ""
            return Written(len(data), digest, etag)
        tmp = self._p(f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            pause = _failpoint("shard_write") if name.startswith("part-") else 0.0
            if pause:
                f.write(data[: len(data) // 2])
                f.flush()
                time.sleep(pause)
                f.write(data[len(data) // 2:])
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._p(name))
        self._fsync_root()
        return Written(len(data), digest)

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Writes `name` only if it does not exist yet; False if it did."""
        if not self.local:
            with store_errors(f"output {self.url}"):
                try:
                    self.fs.pipe_file(self._p(name), data, mode="create")
                except FileExistsError:
                    return False
                except Exception as e:  # botocore's PreconditionFailed has no importable class here
                    if "PreconditionFailed" in str(e) or "412" in str(e):
                        return False
                    raise
            return True
        try:
            fd = os.open(self._p(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        self._fsync_root()
        return True

    def _fsync_root(self) -> None:
        dfd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def clean_temp(self, names=None) -> int:
        """Remove temporary files left by a killed writer (among `names`, default: a fresh listing)."""
        stale = [n for n in (self.list() if names is None else names) if n.startswith(TMP_PREFIX)]
        for n in stale:
            self.delete(n)
        return len(stale)
