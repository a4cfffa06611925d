"""`python -m batchlm run|validate|status`: the pipeline's command line.

Contract
--------
- Imports only the standard library at module import time; Ray, pyarrow and
  pydantic are imported inside the handlers.
- `register(subparsers)` adds `run`, `validate` and `status`, each with
  `set_defaults(func=handler)`; `handler(args) -> exit code`.
- Exit codes: 0 done; 1 a row failed with `on_error: fail`, a stage failed
  (one line naming the root exception and the units not committed), or the run ended
  incomplete; 2 a config or input problem, printed as one message without a
  traceback; 130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM: both stop
  the run the same way (Ray shut down, the lease released, what was
  committed kept) and say how to resume.
"""
from __future__ import annotations

import signal
import sys


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so a run stops exactly as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _add_config_args(p) -> None:
    p.add_argument("config", help="the job's YAML config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set sampling.max_tokens=64 (repeatable)")


def register(sub) -> None:
    p = sub.add_parser("run", help="run a batch job over a dataset (resumes where it stopped)")
    _add_config_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing output written with another config")
    p.add_argument("--verbose", action="store_true",
                   help="also show Ray's own log lines (quiet by default) and its workers' output")
    p.set_defaults(func=run_command)

    p = sub.add_parser("validate", help="check a config and its input without generating")
    _add_config_args(p)
    p.add_argument("--sample", type=int, default=200, help="rows to tokenize for prompt statistics")
    p.add_argument("--no-estimate", action="store_true", help="skip the short timing probe of the engine")
    p.set_defaults(func=validate_command)

    p = sub.add_parser("status", help="tell how far a run got")
    p.add_argument("output", help="the job's output path (local or s3://...)")
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec option for the output, e.g. endpoint_url=http://... (repeatable)")
    p.set_defaults(func=status_command)


def _guarded(fn, args) -> int:
    from batchlm.pipelines.errors import ConfigError, RowFailed, StageFailed

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return fn(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RowFailed, StageFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\n{what}; run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(args) -> int:
    def go(args):
        from batchlm.pipelines.config import load_config
        from batchlm.pipelines.runner import run_job

        result = run_job(load_config(args.config, args.overrides), overwrite=args.overwrite, verbose=args.verbose)
        return 0 if result.complete else 1

    return _guarded(go, args)


def validate_command(args) -> int:
    def go(args):
        from batchlm.pipelines.config import load_config
        from batchlm.pipelines.validate import validate

        print(validate(load_config(args.config, args.overrides), sample=args.sample,
                       estimate=not args.no_estimate))
        return 0

    return _guarded(go, args)


def status_command(args) -> int:
    def go(args):
        from batchlm.pipelines.status import status

        opts = {}
        for kv in args.storage_option:
            key, sep, value = kv.partition("=")
            if not sep:
                from batchlm.pipelines.errors import ConfigError

                raise ConfigError(f"--storage-option {kv!r}: expected KEY=VALUE")
            opts[key] = value
        text, complete = status(args.output, opts)
        print(text)
        return 0

    return _guarded(go, args)
