"""``python -m mtl_experiments.tracking replay <fallback dir>``."""

from __future__ import annotations

import argparse
import logging
import sys

from mtl_experiments.errors import ConfigError
from mtl_experiments.tracking.logger import replay

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """``python -m mtl_experiments.tracking replay <fallback dir> [--tracking-uri URI]``."""
    parser = argparse.ArgumentParser(prog="python -m mtl_experiments.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="upload a run's fallback folder (written while its store was unreachable)")
    p.add_argument("fallback_dir")
    p.add_argument("--tracking-uri", default=None, help="default: $MLFLOW_TRACKING_URI, else the one in run.json")
    args = parser.parse_args(argv)
    try:
        done = replay(args.fallback_dir, args.tracking_uri)
    except (ConfigError, OSError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    print(f"Uploaded {done['metrics']} metric values ({done['skipped']} already in the run) from {args.fallback_dir}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
