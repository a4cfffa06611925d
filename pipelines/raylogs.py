"""Ray's own log lines in a batch run: quiet by default, all of them with `--verbose`.

Contract
--------
Quiet (the default) keeps a successful run's stderr to batchlm's own lines. It goes through
Ray's own switches, never by filtering text:
- `init_kwargs(verbose)`: ray.init's options: the "ray" logger at ERROR (its token-authentication
  warning, "Started a local Ray instance", ...), workers' output not forwarded to the driver.
- `quiet_init(verbose)`: a context around ray.init: `RAY_BACKEND_LOG_LEVEL=fatal` while the
  driver's core worker starts (its `core_worker.cc` E line about actor constructor arguments in
  the object store is advice, not a failure; Ray's C++ logger has no other switch for it). The
  C++ logger announces that level with an INFO line on fd 2, so fd 2 goes to a temporary file
  during ray.init; what ray.init wrote there is printed if it fails, dropped if it succeeds.
  The processes ray.init starts for an embedded Ray inherit the level too (their own log files
  then hold fatal lines only). A RAY_BACKEND_LOG_LEVEL the user set is kept, and nothing is
  captured.
- `quiet_ray_data(verbose)`: after `import ray.data`: Ray Data's console handler at CRITICAL (its
  "Progress bars disabled", per-dataset INFO lines, the "consider setting memory=" warning, and
  the multi-line dump of a stage's exception, which the driver reports in one line instead:
  errors.StageFailed); its log file in the Ray session directory keeps everything. A user's
  RAY_DATA_LOGGING_CONFIG is respected.
Errors still come through: ERROR lines from Ray core, and every exception Ray raises to the driver.
`--verbose` leaves all of Ray's defaults in place and forwards the workers' output.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

BACKEND_ENV = "RAY_BACKEND_LOG_LEVEL"


def init_kwargs(verbose: bool) -> dict:
    if verbose:
        return {"logging_level": logging.INFO, "log_to_driver": True}
    return {"logging_level": logging.ERROR, "log_to_driver": False}


@contextlib.contextmanager
def quiet_init(verbose: bool):
    """Around ray.init: the driver's core worker starts at the fatal level, and this process's
    stderr (fd 2) goes to a temporary file meanwhile (Ray's C++ logger announces the level with an
    INFO line of its own). When ray.init fails, what it wrote there is printed before the error."""
    if verbose or BACKEND_ENV in os.environ:
        yield
        return
    os.environ[BACKEND_ENV] = "fatal"
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            _restore(saved)
            os.close(saved)
            os.environ.pop(BACKEND_ENV, None)


def _restore(saved_fd: int) -> None:
    sys.stderr.flush()
    os.dup2(saved_fd, 2)


def quiet_ray_data(verbose: bool) -> None:
    if os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    level = logging.INFO if verbose else logging.CRITICAL
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # the handler Ray Data's default logging config names so
            handler.setLevel(level)
