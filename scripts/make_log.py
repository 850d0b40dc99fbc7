"""Write a ``recsys_synthetic`` log as Parquet shards in bounded memory, to rehearse ``data=stream`` at any size.

The world (users, items, features, feature effects, signals, timestamps) is ``recsys_synthetic``'s
(``mtl_experiments/data/recsys_synthetic.py``); the log is generated one shard at a time
(``generate_windows``: shard k holds the k-th time window, so the shards are in time order), so memory stays
that of one shard's rows whatever ``--rows`` is. Columns: ``row_id`` (0-based, in time order: the row's
identity for exactly-once checks), ``user_id``, ``item_id``, ``timestamp`` (seconds), the user features
``age_bucket``, ``region``, ``activity_level``, the item features ``category``, ``price_bucket``, the numeric
``user_activity`` and ``item_log_duration``, and the signals ``click``, ``like``, ``watch_time``, ``interest``,
``next_item_id``: exactly what ``conf/data/stream.yaml`` reads by default::

    python scripts/make_log.py --rows 100000000 --shards 100 --out log
    python train.py data=stream data.path=log

Any ``recsys_synthetic`` setting can be given as ``--set key=value`` (e.g. ``--set correlation.like=0.8``).
Shards are written atomically (a temporary name, then a rename), so a killed run leaves no half shard.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mtl_experiments.data.recsys_synthetic import ITEM_FEATURES, NUMERIC, USER_FEATURES, WorldConfig, generate_windows

SIGNAL_COLUMNS = ("click", "like", "watch_time", "interest", "next_item_id")
ROW_GROUP = 1 << 16  # rows per Parquet row group: the unit pyarrow.dataset reads (bounded, and cheap to skip)


def shard_table(users: dict, items: dict, log: dict[str, np.ndarray], first_row: int) -> pa.Table:
    """One shard's columns (see the module docstring) from a window of ``generate_windows``."""
    u, i = log["user_id"] - 1, log["item_id"] - 1
    columns = {
        "row_id": np.arange(first_row, first_row + len(u), dtype=np.int64),
        **{k: log[k] for k in ("user_id", "item_id", "timestamp")},
        **{f: users[f][u] for f in USER_FEATURES},
        **{f: items[f][i] for f in ITEM_FEATURES},
        NUMERIC[0]: users["user_activity"][u],
        NUMERIC[1]: items["item_log_duration"][i],
        **{s: log[s] for s in SIGNAL_COLUMNS},
    }
    return pa.table(columns)


def write_log(out: Path, rows: int, shards: int, seed: int = 0, row_group: int = ROW_GROUP, **settings) -> list[Path]:
    """Write ``shards`` files ``part-00000.parquet`` ... of ``rows`` rows in all to ``out``; returns their paths."""
    if shards < 1 or rows < shards:
        raise SystemExit(f"Error: --rows ({rows}) must be >= --shards ({shards}) >= 1 (every shard needs a row).")
    config = WorldConfig(num_interactions=rows, seed=seed, **settings)
    out.mkdir(parents=True, exist_ok=True)
    size, extra = divmod(rows, shards)
    starts = np.concatenate([[0], np.cumsum([size + (k < extra) for k in range(shards)])])
    paths = []
    for k, users, items, log in generate_windows(config, shards):
        path = out / f"part-{k:05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        pq.write_table(shard_table(users, items, log, int(starts[k])), tmp, row_group_size=row_group)
        os.replace(tmp, path)
        paths.append(path)
    return sorted(paths)


def parse_settings(pairs: list[str]) -> dict:
    """``key=value`` (YAML values; ``a.b=v`` nests) -> keyword arguments of ``WorldConfig``."""
    settings: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"Error: --set takes key=value, got {pair!r} (e.g. --set num_categories=50).")
        node = settings
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True, help="impressions in all")
    parser.add_argument("--shards", type=int, required=True, help="Parquet files (one time window each)")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write (created)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the world and the log")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recsys_synthetic key")
    args = parser.parse_args(argv)
    settings = {"num_users": args.users, "num_items": args.items, **parse_settings(args.set)}
    start = time.perf_counter()
    paths = write_log(args.out, args.rows, args.shards, args.seed, **settings)
    size = sum(p.stat().st_size for p in paths) / 2**20
    print(
        f"{args.rows} rows in {len(paths)} shards ({size:.1f} MiB) written to {args.out} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
