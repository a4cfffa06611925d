"""One writer per output: a lease object in the output root.

Contract
--------
- `Lease(store, ttl=60, interval=10).acquire() -> str | None` creates
  `_lease.json` only if it does not exist (local: O_EXCL; S3: a conditional
  PUT, `If-None-Match: *`), holding host, pid, the pid's start time, a random
  token and a heartbeat time. It returns a note when it took over a stale
  lease, and raises ConfigError naming the holder while another run is alive.
- A lease is stale when its heartbeat is older than `ttl` seconds, or at
  once when it names a process on this host that no longer runs (a run
  killed with SIGKILL is resumed without waiting).
- While held, a daemon thread renews the heartbeat every `interval` seconds;
  if it finds the lease taken over (this run stalled past `ttl`), `lost`
  becomes True and the runner stops before its next commit.
- `release()` stops the thread and deletes the lease if it is still ours.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from batchlm.pipelines.errors import ConfigError

LEASE = "_lease.json"


def _pid_start(pid: int) -> str:
    """The process's start time (Linux /proc), to tell a reused pid apart; '' elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(holder: dict) -> bool:
    """False when the holder ran on this host and its process is gone."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = int(holder.get("pid") or 0)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    start = holder.get("pid_start")
    return not start or start == _pid_start(pid)


class Lease:
    def __init__(self, store, ttl: float = 60.0, interval: float = 10.0):
        self.store = store
        self.ttl = ttl
        self.interval = interval
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"host": socket.gethostname(), "pid": pid, "pid_start": _pid_start(pid),
                           "token": self.token, "started": self.started, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.store.read(LEASE))
            return holder if isinstance(holder, dict) else {}
        except ConfigError:  # gone between the listing and the read
            return None
        except ValueError:  # half-written by a writer killed mid-create: stale
            return {}

    def acquire(self) -> str | None:
        note = None
        for _ in range(5):
            if self.store.create_exclusive(LEASE, self._body()):
                self._start()
                return note
            holder = self._holder()
            if holder is None:
                continue
            if holder.get("token") == self.token:  # our create went through; a retry of it got the 412
                self._start()
                return note
            age = time.time() - float(holder.get("heartbeat") or 0)
            if _alive(holder) and age < self.ttl:
                raise ConfigError(
                    f"output {self.store.url} is being written by another run (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, last heartbeat {age:.0f} s ago); wait for it to finish or stop "
                    f"it (a lease not renewed for {self.ttl:.0f} s is taken over)")
            why = "its process is gone" if not _alive(holder) else f"no heartbeat for {age:.0f} s"
            note = (f"took over the lease of an earlier run (host {holder.get('host')}, pid {holder.get('pid')}): "
                    f"{why}")
            self.store.delete(LEASE)
        raise ConfigError(f"output {self.store.url}: could not take the lease {LEASE}; another run keeps taking it")

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._renew, name="batchlm-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                holder = self._holder()
                if not holder or holder.get("token") != self.token:
                    self.lost = True
                    return
                self.store.write_atomic(LEASE, self._body())
            except Exception:  # a failed renewal is retried; the ttl is several intervals
                continue

    def check(self) -> None:
        """Raises ConfigError if another run took the lease over."""
        if self.lost:
            raise ConfigError(f"output {self.store.url}: another run took over this run's lease (this run "
                              f"stalled for more than {self.ttl:.0f} s); stopping before the next commit")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder and holder.get("token") == self.token:
            self.store.delete(LEASE)
