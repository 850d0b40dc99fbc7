"""Split modes (mtl_experiments/data/splits.py): what each one guarantees, determinism and errors."""

from __future__ import annotations

import numpy as np
import pytest

from mtl_experiments.data.splits import SPLIT_MODES, check_split_options, split_rows
from mtl_experiments.errors import ConfigError

N = 3000


def log(seed: int = 0) -> dict[str, np.ndarray]:
    """A small log: 100 users, 60 items (a few unknown id-0 rows), timestamps with many ties."""
    rng = np.random.default_rng(seed)
    user, item = rng.integers(1, 101, N), rng.integers(1, 61, N)
    user[::97] = 0
    item[::89] = 0
    return {"user_id": user, "item_id": item, "timestamp": rng.integers(0, 500, N)}


def split(mode: str, data=None, **kwargs) -> dict[str, np.ndarray]:
    options = dict(val_fraction=0.1, test_fraction=0.2, cold_fraction=0.2, seed=0) | kwargs
    return split_rows(mode, N, **(data or log()), **options)


@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_every_mode_partitions_the_rows_into_sorted_indices(mode):
    parts = split(mode)
    assert list(parts) == ["train", "val", "test"]
    for rows in parts.values():
        assert rows.dtype == np.int64 and len(rows) > 0 and (np.diff(rows) > 0).all()
    assert np.array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(N))


@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_same_seed_same_split_other_seed_other_split(mode):
    a, b, c = split(mode), split(mode), split(mode, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    if mode == "temporal":  # a function of the timestamps alone
        assert all(np.array_equal(a[k], c[k]) for k in a)
    else:
        assert not np.array_equal(a["val"], c["val"])


def test_random_sizes_and_order():
    parts = split("random")
    assert {k: len(v) for k, v in parts.items()} == {"train": 2100, "val": 300, "test": 600}
    # the permutation's first draws are val, the next test (datasets that carved splits this way keep them)
    order = np.random.default_rng(0).permutation(N)
    assert np.array_equal(parts["val"], np.sort(order[:300]))
    assert np.array_equal(parts["test"], np.sort(order[300:900]))


@pytest.mark.parametrize(("mode", "key"), [("cold_user", "user_id"), ("cold_item", "item_id")])
def test_cold_modes_hold_ids_out_of_training(mode, key):
    data = log()
    ids = data[key]
    parts = split(mode, data)
    train, val, test = (set(ids[parts[k]].tolist()) - {0} for k in ("train", "val", "test"))
    known = set(ids.tolist()) - {0}
    cold_val, cold_test = val - train, test - train
    assert cold_val and cold_test and not cold_val & cold_test  # disjoint held-out ids, some in each split
    assert len(cold_val | cold_test) == round(0.2 * len(known))  # cold_fraction of the ids
    assert abs(len(cold_val) - len(cold_test)) <= 1  # half of them each
    assert cold_val | cold_test | train == known
    # every row of a held-out id is in val (or test): none left in train or in the other split
    for cold, k in ((cold_val, "val"), (cold_test, "test")):
        rows = np.flatnonzero(np.isin(ids, list(cold)))
        assert np.isin(rows, parts[k]).all()
    # warm ids have rows in all three splits; val and test also hold warm rows (fractions of the warm rows)
    warm_rows = np.flatnonzero(~np.isin(ids, list(cold_val | cold_test)))
    for k, fraction in (("val", 0.1), ("test", 0.2)):
        assert np.isin(parts[k], warm_rows).sum() == int(len(warm_rows) * fraction)
        assert len(set(ids[np.intersect1d(parts[k], warm_rows)].tolist()) & train) > 0.8 * len(train)
    assert (ids[parts["train"]] == 0).any()  # the unknown id 0 is never "held out"


def test_cold_held_out_ids_follow_the_seed_and_fraction():
    ids = log()["user_id"]

    def cold(**kwargs) -> set[int]:
        parts = split("cold_user", **kwargs)
        return set(ids[np.concatenate([parts["val"], parts["test"]])].tolist()) - set(ids[parts["train"]].tolist())

    assert cold() == cold() != cold(seed=3)
    assert len(cold(cold_fraction=0.5)) == 50
    assert len(cold(cold_fraction=0.001)) == 2  # at least one cold user for val and one for test


def test_temporal_trains_on_the_past():
    data = log()
    ts = data["timestamp"]
    parts = split("temporal", data)
    assert {k: len(v) for k, v in parts.items()} == {"train": 2100, "val": 300, "test": 600}
    assert ts[parts["train"]].max() <= ts[parts["val"]].min()
    assert ts[parts["val"]].max() <= ts[parts["test"]].min()
    # ties at a boundary are broken by row order: the earlier row goes to the earlier split
    order = np.argsort(ts, kind="stable")
    assert np.array_equal(parts["val"], np.sort(order[2100:2400]))


@pytest.mark.parametrize(
    ("mode", "kwargs", "drop", "message"),
    [
        ("leave_one_out", {}, None, r"data.split must be one of \['random', 'cold_user', 'cold_item', 'temporal'\]"),
        ("cold_user", {}, "user_id", r"data.split=cold_user needs the rows' user_id"),
        ("cold_item", {}, "item_id", r"data.split=cold_item needs the rows' item_id"),
        ("temporal", {}, "timestamp", r"data.split=temporal needs the rows' timestamp"),
        ("random", {"val_fraction": 0.0}, None, r"data.val_fraction must be a number in \(0, 1\), got 0.0"),
        ("random", {"test_fraction": 1.5}, None, r"data.test_fraction must be a number in \(0, 1\)"),
        ("random", {"val_fraction": 0.5, "test_fraction": 0.5}, None, r"must be < 1 \(the rest trains\)"),
        ("cold_user", {"cold_fraction": 1.0}, None, r"data.cold_fraction must be a number in \(0, 1\)"),
        ("cold_item", {"cold_fraction": 0.995}, None, r"60 items are too few to hold out 60"),
        ("random", {"val_fraction": 1e-4}, None, r"3000 rows are too few for data.val_fraction=0.0001 to give a non"),
    ],
)
def test_errors(mode, kwargs, drop, message):
    data = log() | ({drop: None} if drop else {})
    with pytest.raises(ConfigError, match=message):
        split(mode, data, **kwargs)


def test_check_split_options_fails_early():
    check_split_options("cold_user", 0.1, 0.1, 0.1)
    check_split_options("random", 7, 0.1, 0.1)  # cold_fraction only matters to the cold modes
    with pytest.raises(
        ConfigError, match=r"data.cold_fraction must be a number in \(0, 1\), got 0 \(for data.split=cold_item"
    ):
        check_split_options("cold_item", 0, 0.1, 0.1)
    with pytest.raises(ConfigError, match=r"data.split=temporal: 5 rows are too few for data.val_fraction=0.1"):
        check_split_options("temporal", 0.1, 0.1, 0.1, num_rows=5)
    with pytest.raises(ConfigError, match=r"data.val_fraction must be a number in \(0, 1\), got True"):
        check_split_options("random", 0.1, True, 0.1)
