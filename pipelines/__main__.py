"""`python -m batchlm.pipelines run|validate|status ...`: the pipeline commands
alone, the same handlers `python -m batchlm` registers."""
from __future__ import annotations

import argparse
import sys

from batchlm.pipelines.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m batchlm.pipelines", description=__doc__.splitlines()[0])
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
