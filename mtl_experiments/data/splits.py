"""Train / validation / test splits of an interaction log, including the cold-start and temporal protocols.

``random`` draws rows at random. ``cold_user`` holds a ``cold_fraction`` share of the users out of training
entirely (half of them, by user, go to validation, the rest to test), the standard protocol for evaluating
new-user (user cold-start) recommendation, e.g. in DropoutNet (Volkovs et al., NeurIPS 2017); the remaining
(warm) users' rows are split at random by ``val_fraction`` / ``test_fraction``, so validation and test hold
both warm and cold rows and report them as separate segments. ``cold_item`` does the same by item.
``temporal`` trains on the earliest rows and evaluates on later ones (train < val < test in time; the
"leave-last-out by time" protocol that avoids training on the future, cf. Ji et al., "A Critical Study on Data
Leakage in Recommender System Offline Evaluation", TOIS 2023).

Every mode is a function of its inputs and ``seed`` alone (numpy, no global state), and returns sorted row
indices, so a log kept in time order stays in time order within each split.
"""

from __future__ import annotations

import math

import numpy as np

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError

SPLIT_MODES = ("random", "cold_user", "cold_item", "temporal")
COLD_KEY = {"cold_user": "user_id", "cold_item": "item_id"}  # the id column a cold mode holds out


def check_split_options(
    split: str, cold_fraction: float, val_fraction: float, test_fraction: float, num_rows: int | None = None
) -> None:
    """Raise a ConfigError for an unknown mode or fractions out of range (call it in a dataset's ``__init__``,
    before anything is read or trained). With ``num_rows`` (a dataset that knows its size up front), also for
    a log too small to give three non-empty splits."""
    checks.choice("data.split", split, SPLIT_MODES)
    for key, value in {"val_fraction": val_fraction, "test_fraction": test_fraction}.items():
        checks.fraction(f"data.{key}", value, open_low=True, open_high=True)
    if val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction must be < 1 (the rest trains), got {val_fraction} + "
            f"{test_fraction}."
        )
    if split in COLD_KEY:
        hint = f"for data.split={split}: the share of {COLD_KEY[split][:-3]}s held out of training"
        checks.fraction("data.cold_fraction", cold_fraction, open_low=True, open_high=True, hint=hint)
    if num_rows is not None:
        _random_parts(split, int(num_rows), val_fraction, test_fraction)


def _random_parts(mode: str, n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """Sizes of val and test for ``n`` rows split by fraction; a ConfigError if a split would be empty."""
    n_val, n_test = math.floor(n * val_fraction), math.floor(n * test_fraction)
    for name, size, fraction in (("val", n_val, val_fraction), ("test", n_test, test_fraction)):
        if size < 1:
            raise ConfigError(
                f"data.split={mode}: {n} rows are too few for data.{name}_fraction={fraction} to give a non-empty "
                f"{name} split; use more rows or a larger fraction."
            )
    if n - n_val - n_test < 1:
        raise ConfigError(f"data.split={mode}: {n} rows leave nothing to train on after the val and test splits.")
    return n_val, n_test


def _random_rows(rows: np.ndarray, mode: str, val_fraction: float, test_fraction: float, rng: np.random.Generator):
    """``rows`` at random into (train, val, test); val takes the first draws, then test, then train."""
    n_val, n_test = _random_parts(mode, len(rows), val_fraction, test_fraction)
    order = rows[rng.permutation(len(rows))]
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def split_rows(
    mode: str,
    num_rows: int,
    *,
    user_id: np.ndarray | None,
    item_id: np.ndarray | None,
    timestamp: np.ndarray | None,
    val_fraction: float,
    test_fraction: float,
    cold_fraction: float,
    seed: int,
) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}``: sorted int64 row indices partitioning ``range(num_rows)``.

    random: rows drawn at random (``floor(n * fraction)`` rows each for val and test). cold_user: a
    ``cold_fraction`` share of the users (``round``, at least 2, seeded) is held out entirely; half of them (by
    user) go to val, the rest to test; the other users' rows split at random by val/test fractions (so val
    and test also get warm rows). Id 0 (unknown) is never held out. cold_item: the same by item. temporal:
    by ``timestamp`` (train the earliest rows, then val, then test), ties broken by row order. Raises a
    ConfigError for an unknown mode, a missing column for the mode, fractions out of range, or an empty split.
    """
    check_split_options(mode, cold_fraction, val_fraction, test_fraction)
    n = int(num_rows)
    columns = {"user_id": user_id, "item_id": item_id, "timestamp": timestamp}
    needed = COLD_KEY.get(mode) or ("timestamp" if mode == "temporal" else None)
    if needed is not None:
        if columns[needed] is None:
            raise ConfigError(f"data.split={mode} needs the rows' {needed}, and this dataset has none.")
        if len(columns[needed]) != n:
            raise ConfigError(f"split_rows: {needed} has {len(columns[needed])} rows, expected {n}.")
    rng = np.random.default_rng(seed)

    if mode == "random":
        train, val, test = _random_rows(np.arange(n), mode, val_fraction, test_fraction, rng)
    elif mode == "temporal":
        n_val, n_test = _random_parts(mode, n, val_fraction, test_fraction)
        order = np.argsort(np.asarray(timestamp), kind="stable")  # stable: equal timestamps keep row order
        n_train = n - n_val - n_test
        train, val, test = order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]
    else:
        ids = np.asarray(columns[COLD_KEY[mode]])
        what = COLD_KEY[mode][:-3]
        known = np.unique(ids[ids != 0])
        n_cold = max(2, round(cold_fraction * len(known)))
        if n_cold >= len(known):
            raise ConfigError(
                f"data.split={mode}: {len(known)} {what}s are too few to hold out {n_cold} (data.cold_fraction="
                f"{cold_fraction}, at least one for val and one for test) and keep some for training; use more "
                f"{what}s or a smaller data.cold_fraction."
            )
        cold = rng.permutation(known)[:n_cold]
        cold_val, cold_test = cold[: n_cold // 2], cold[n_cold // 2 :]
        is_cold = np.isin(ids, cold)
        train, warm_val, warm_test = _random_rows(np.flatnonzero(~is_cold), mode, val_fraction, test_fraction, rng)
        val = np.concatenate([warm_val, np.flatnonzero(np.isin(ids, cold_val))])
        test = np.concatenate([warm_test, np.flatnonzero(np.isin(ids, cold_test))])
    return {name: np.sort(rows).astype(np.int64) for name, rows in (("train", train), ("val", val), ("test", test))}
