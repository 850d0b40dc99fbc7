"""``mtl-recommend`` / ``python scripts/recommend.py``: top-K items per user from a run id or a checkpoint, as a
table or JSON; every bad input is one ``Error:`` line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError, MTLError
from mtl_experiments.recommend.loading import load_checkpoint, load_run
from mtl_experiments.recommend.scoring import FUSIONS, check_k, fusion_weights, recommend


def _pairs(text: str, what: str) -> dict[str, str]:
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} takes key=value pairs separated by commas, got {part!r}.")
        out[key.strip()] = value.strip()
    return out


def parse_users(text: str) -> list[int]:
    try:
        users = [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise ConfigError(f"--users takes user ids separated by commas (e.g. 12,57), got {text!r}.") from None
    if not users:
        raise ConfigError("--users names no user id.")
    return users


def parse_weights(text: str) -> dict[str, float]:
    out = {}
    for name, value in _pairs(text, "--weights").items():
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--weights {name}={value!r} is not a number.") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl-recommend",
        description=(
            "Top-K items for given users from a trained model, with each task's score and a fused ranking score. "
            "Unknown user ids are scored as new users from --user-features."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run id: its best checkpoint (local folder, else run artifact)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint written by train.py")
    p.add_argument("--tracking-uri", help="MLflow store of --run-id (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--users", required=True, help="user ids, comma-separated, e.g. 12,57")
    p.add_argument(
        "--user-features",
        help="features of the users the dataset does not know (every user column), e.g. region=3,age_bucket=2",
    )
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    p.add_argument("--exclude-seen", action="store_true", help="drop items the user interacted with in training")
    p.add_argument("--fusion", choices=FUSIONS, default="product", help="product (default): Σ w log p; sum: Σ w s")
    p.add_argument("--weights", help="fusion weights replacing the defaults, e.g. click=1,like=2 (tasks not named: 0)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--device", default="cpu", help="torch device to score on (default cpu)")
    p.add_argument("--batch-size", type=int, default=8192, help="items per forward pass")
    return p


def format_table(results: Sequence[dict[str, Any]], task_names: Sequence[str]) -> str:
    """One block per user: rank, item, fused score and each task's score, fixed-width columns."""
    lines = []
    for block in results:
        head = f"user {block['user_id']}" + (" (new user, scored from --user-features)" if block["new_user"] else "")
        if block["excluded"]:
            head += f"; {block['excluded']} items seen in training excluded"
        lines.append(head)
        columns = ["rank", "item_id", "score", *task_names]
        rows = [
            [str(r["rank"]), str(r["item_id"]), f"{r['score']:.4f}"]
            + [f"{v:.4f}" if isinstance(v, float) else str(v) for v in (r["tasks"][n] for n in task_names)]
            for r in block["items"]
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        if not rows:
            lines.append("(no items left)")
        lines.append("")
    return "\n".join(lines)


def serve(args: argparse.Namespace) -> tuple[Any, dict[str, float], list[dict[str, Any]]]:
    """Load the model and rank every user's items: (served model, fusion weights, one block per user)."""
    users = parse_users(args.users)
    weights = parse_weights(args.weights) if args.weights else None
    features = _pairs(args.user_features, "--user-features") if args.user_features else None
    checks.positive_int("--batch-size", args.batch_size)
    if args.run_id:
        served = load_run(args.run_id, args.tracking_uri, device=args.device)
    else:
        served = load_checkpoint(args.checkpoint, device=args.device)
    catalog, tasks = served.catalog, served.tasks
    fused = fusion_weights(tasks, args.fusion, weights)  # bad weights fail before any user is scored
    check_k("--k", args.k, catalog.num_items)
    for note in served.notes:
        print(f"Note: {note}.", file=sys.stderr)
    results = []
    for user in users:
        known = catalog.knows_user(user)
        if known and features is not None:
            print(f"Note: user {user} is known: scored with its own features, not --user-features.", file=sys.stderr)
        rows = recommend(
            served.model,
            catalog,
            tasks,
            user,
            args.k,
            user_features=None if known else features,
            exclude_seen=args.exclude_seen,
            fusion=args.fusion,
            weights=weights,
            batch_size=args.batch_size,
        )
        excluded = len(catalog.seen_items(user)) if args.exclude_seen and known else 0
        results.append({"user_id": user, "new_user": not known, "excluded": excluded, "items": rows})
    return served, fused, results


def main(argv: Sequence[str] | None = None) -> int:
    """``mtl-recommend`` / ``python scripts/recommend.py``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        served, fused, results = serve(args)
    except MTLError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        out = {
            "checkpoint": served.checkpoint,
            "fusion": args.fusion,
            "weights": fused,
            "users": [
                {**b, "items": [{k: v for k, v in r.items() if k != "user_id"} for r in b["items"]]} for b in results
            ],
        }
        print(json.dumps(out, indent=1))
    else:
        print(
            f"checkpoint {served.checkpoint}; {args.fusion} fusion, weights "
            + ", ".join(f"{n}={w:g}" for n, w in fused.items() if w)
            + "\n"
        )
        print(format_table(results, list(served.tasks)))
    return 0
