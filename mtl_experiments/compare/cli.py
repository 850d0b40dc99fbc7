"""``mtl-compare`` / ``python scripts/compare_runs.py``: read runs, compare them, print Markdown, and
optionally write the files and log them to the sweep's parent run."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mtl_experiments.compare.comparison import compare
from mtl_experiments.compare.front_output import run_front
from mtl_experiments.compare.output import log_to_parent, pareto_keys, skipped_summary, to_markdown, write_outputs
from mtl_experiments.compare.runs import ROLE_TAG, SWEEP_PARENT, load_runs
from mtl_experiments.errors import ConfigError, MTLError


def _tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--tag takes key=value, got {text!r}")
    return key, value


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl-compare",
        description=(
            "Compare tracked runs: group runs that differ only by seed; per-task test metrics as mean ± std, "
            "Δm% against single-task runs of the same data (positive = better), conflict summaries; "
            "Markdown to stdout, optionally Markdown/CSV/Pareto plot files."
        ),
    )
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--experiment", help="experiment name (default: all experiments, or the parent run's)")
    sweep = p.add_mutually_exclusive_group()
    sweep.add_argument(
        "--parent", metavar="RUN_ID", help="only the child runs of this parent (sweep) run; its first 8 characters do"
    )
    sweep.add_argument(
        "--latest-sweep", action="store_true", help=f"only the children of the latest {ROLE_TAG}={SWEEP_PARENT} run"
    )
    p.add_argument("--tag", type=_tag, action="append", default=[], metavar="KEY=VALUE", help="tag filter (repeat)")
    p.add_argument(
        "--segment",
        help="compare on an evaluation segment's test metrics (warm, cold_user, cold_item) instead of the whole split",
    )
    p.add_argument("--metrics", type=_csv, help="metrics Δm averages over, e.g. auroc,mse or y1/auroc (default: all)")
    p.add_argument("--pareto", type=_csv, help="x,y test metrics of the Pareto plot (default: first metric of 2 tasks)")
    p.add_argument(
        "--front",
        nargs="?",
        const="",
        metavar="SWEEP_OR_EXPERIMENT",
        help="place every method of the selection on the front of the static-weight runs (loss=fixed, e.g. "
        "hparams_search=scalarization) of this sweep parent run id or experiment (no value: those in the selection); "
        "--out writes front.md, front.csv, front.png",
    )
    p.add_argument("--out", type=Path, help="write comparison.md, comparison.csv and pareto.png here")
    p.add_argument("--log-to-parent", action="store_true", help="log the files as artifacts of the parent run")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``mtl-compare`` / ``python scripts/compare_runs.py``; returns the exit code (2 on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.front is not None and args.log_to_parent:
        parser.error("--log-to-parent is not available with --front; write its files with --out")
    if args.log_to_parent and not (args.parent or args.latest_sweep):
        parser.error("--log-to-parent needs --parent RUN_ID or --latest-sweep")
    try:
        selection = load_runs(
            args.tracking_uri,
            experiment=args.experiment,
            parent=args.parent,
            latest=args.latest_sweep,
            tags=dict(args.tag),
            segment=args.segment,
        )
        if args.front is not None:
            run_front(args, selection)
            return 0
        if not selection.runs:
            raise ConfigError(f"No FINISHED runs with test metrics match the selection ({skipped_summary(selection)}).")
        result = compare(selection, metrics=args.metrics)
        for warning in result.warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        if args.pareto:
            pareto_keys(result, args.pareto)  # fail on a bad --pareto before writing anything
        print(to_markdown(result))
        with tempfile.TemporaryDirectory() as tmp:  # --log-to-parent without --out: files only in MLflow
            if args.out or args.log_to_parent:
                files = write_outputs(result, args.out or tmp, args.pareto)
                if args.out:
                    print(f"Wrote {', '.join(str(f) for f in files)}", file=sys.stderr)
                if args.log_to_parent:
                    log_to_parent(result, files)
                    where = f"parent run {selection.parent_id}, artifact folder comparison/"
                    print(f"Logged {len(files)} files to {where}", file=sys.stderr)
    except MTLError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
