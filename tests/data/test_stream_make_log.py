"""scripts/make_log.py and ``generate_windows``: the chunked log is recsys_synthetic's world and log (one window:
exactly ``generate``'s; several: time order, the same users and items, next-item links across windows)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from mtl_experiments.data.interactions import next_positive_item
from mtl_experiments.data.recsys_synthetic import WorldConfig, generate, generate_windows
from scripts.make_log import write_log

WORLD = {"num_users": 300, "num_items": 120, "num_interactions": 4000, "latent_dim": 4, "seed": 5}


def test_one_window_is_generate_exactly():
    config = WorldConfig(**WORLD)
    expected = generate(config)["log"]
    ((k, _, _, log),) = list(generate_windows(config, 1))
    assert k == 0 and set(log) == set(expected)
    for column, values in expected.items():
        np.testing.assert_array_equal(log[column], values, err_msg=column)


def test_windows_share_the_world_and_link_next_items():
    config = WorldConfig(**WORLD)
    windows = sorted(generate_windows(config, 4), key=lambda w: w[0])
    assert [len(w[3]["user_id"]) for w in windows] == [1000] * 4
    log = {c: np.concatenate([w[3][c] for w in windows]) for c in windows[0][3]}
    assert (np.diff(log["timestamp"]) >= 0).all() and log["timestamp"].max() < 30 * 86400
    expected = next_positive_item(log["user_id"], log["item_id"], log["click"] > 0)
    np.testing.assert_array_equal(log["next_item_id"], expected)  # links across windows as within them
    users = generate(config)["users"]  # the same world as the in-memory generator's
    np.testing.assert_array_equal(windows[2][1]["age_bucket"], users["age_bucket"])
    assert (log["like"] <= log["click"]).all() and abs(log["click"].mean() - config.click_rate) < 0.01


def test_write_log_shards(tmp_path):
    paths = write_log(tmp_path / "log", rows=1001, shards=3, seed=1, num_users=50, num_items=30, latent_dim=4)
    assert [p.name for p in paths] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    tables = [pq.read_table(p) for p in paths]
    assert [t.num_rows for t in tables] == [334, 334, 333]
    row_id = np.concatenate([t.column("row_id").to_numpy() for t in tables])
    np.testing.assert_array_equal(row_id, np.arange(1001))
    first = tables[1].to_pydict()
    users = generate(WorldConfig(num_users=50, num_items=30, latent_dim=4, num_interactions=10, seed=1))["users"]
    np.testing.assert_array_equal(np.array(first["region"]), users["region"][np.array(first["user_id"]) - 1])
