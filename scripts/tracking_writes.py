"""What MLflow's metric writes cost the training thread: synchronous against the logger's writer thread (issue 17).

``mtl_experiments/bench/tracking_writes.py`` says what is measured. Any Hydra override of ``train.py`` applies::

    OMP_NUM_THREADS=1 python scripts/tracking_writes.py --epochs 3 --repeats 5 --json tracking_writes.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from mtl_experiments.bench import tracking_writes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--calls", type=int, default=200, help="log_metrics calls per per-call measurement")
    parser.add_argument("--keys", type=int, default=12, help="values per log_metrics call")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    args, overrides = parser.parse_known_args(argv)
    if min(args.epochs, args.repeats, args.calls, args.keys) < 1:
        parser.error("--epochs, --repeats, --calls and --keys must be >= 1")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module=r"lightning\.")
    result = tracking_writes.run(overrides, args.epochs, args.repeats, args.calls, args.keys)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
