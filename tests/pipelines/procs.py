"""Process helpers for kill tests: a driver in its own session, killed with
SIGKILL, and then whatever it left in that session (the embedded Ray's
workers and agents, which outlive a killed driver for a while)."""
from __future__ import annotations

import os
import signal
import subprocess
import time


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and int(entry) != os.getpid():  # field 6 of stat: session id
            pids.append(int(entry))
    return pids


def start_driver(args: list[str], env: dict, log_path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_driver(proc: subprocess.Popen, grace: float = 0.5) -> None:
    """kill -9 the driver, then (after `grace`) everything left in its session."""
    sid = proc.pid  # start_new_session: the driver leads its own session
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    time.sleep(grace)
    for _ in range(3):
        left = session_pids(sid)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.3)
