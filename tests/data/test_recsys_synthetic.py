"""The synthetic recommender scenario: world, signals, popularity, content vectors, config errors, training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_experiments.data.interactions import next_positive_item
from mtl_experiments.data.recsys_synthetic import (
    CATEGORICAL,
    DEFAULT_TASKS,
    NUMERIC,
    RecsysSyntheticDataModule,
    WorldConfig,
    generate,
    signal_directions,
)
from mtl_experiments.errors import ConfigError
from mtl_experiments.pipeline import train
from tests.conftest import RECSYS_TINY

SMALL = dict(num_users=300, num_items=200, num_interactions=20_000, latent_dim=8, num_categories=10)


def module(tmp_path: Path, **kwargs) -> RecsysSyntheticDataModule:
    options = {**SMALL, "content_dim": 16, "cache_dir": str(tmp_path / "cache"), **kwargs}
    dm = RecsysSyntheticDataModule(**options)
    dm.setup()
    return dm


def flat(split: dict) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in split.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flat(value).items()})
        else:
            out[key] = value
    return out


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a, b = module(tmp_path / "a"), module(tmp_path / "b")
    c = module(tmp_path / "c", seed=1)
    for split in ("train", "val", "test"):
        fa, fb = flat(a.splits[split]), flat(b.splits[split])
        assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert not torch.equal(a.splits["train"]["features"]["categorical"], c.splits["train"]["features"]["categorical"])
    assert np.array_equal(np.load(a.content_vectors_path), np.load(b.content_vectors_path))


def test_more_interactions_keep_the_same_users_and_items():
    small, large = generate(WorldConfig(**{**SMALL, "num_interactions": 500})), generate(WorldConfig(**SMALL))
    for side in ("users", "items"):
        for key, value in small[side].items():
            assert np.array_equal(value, large[side][key]), (side, key)


def test_batches_carry_ids_timestamps_and_every_signal(tmp_path):
    dm = module(tmp_path)
    assert list(dm.tasks) == list(DEFAULT_TASKS)  # tasks default to click, like, watch_time, interest
    assert dm.feature_spec.numeric == NUMERIC
    assert list(dm.feature_spec.categorical) == list(CATEGORICAL)
    assert dm.feature_spec.categorical["user_id"] == 301 and dm.feature_spec.categorical["item_id"] == 201
    sizes = {k: len(s["user_id"]) for k, s in dm.splits.items()}
    assert sizes == {"train": 16_000, "val": 2_000, "test": 2_000}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"features", "labels", "user_id", "item_id", "timestamp"}
    cat = batch["features"]["categorical"]
    assert torch.equal(batch["user_id"], cat[:, 0]) and torch.equal(batch["item_id"], cat[:, 1])
    cards = torch.tensor(list(dm.feature_spec.categorical.values()))
    for split in dm.splits.values():
        ids = split["features"]["categorical"]
        assert bool((ids >= 1).all() and (ids < cards).all())  # 1-based: id 0 stays free for unknown values
        assert bool((split["timestamp"].diff() >= 0).all())  # each split in time order
    # the splits partition the log
    rows = torch.cat([s["timestamp"] for s in dm.splits.values()]).sort().values
    assert torch.equal(rows, torch.from_numpy(dm.interactions["timestamp"]))


def test_like_only_after_click_and_watch_time_only_when_clicked():
    log = generate(WorldConfig(**SMALL, click_rate=0.3, like_rate=0.25))["log"]
    click, like, watch = log["click"], log["like"], log["watch_time"]
    assert click.mean() == pytest.approx(0.3, abs=1e-3)
    assert (like <= click).all() and like.sum() > 0
    assert (watch[click == 0] == 0).all() and (watch[click == 1] > 0).all()
    assert np.allclose(watch, np.log1p(log["watch_seconds"]))
    assert set(np.unique(log["interest"])) == {0.0, 1.0}


def test_interest_is_a_property_of_the_user_and_category():
    world = generate(WorldConfig(**SMALL, interest_top_k=2))
    users, items, log = world["users"], world["items"], world["log"]
    table = users["interested_categories"]
    assert (table.sum(axis=1) == 2).all()
    expected = table[log["user_id"] - 1, items["category"][log["item_id"] - 1] - 1]
    assert np.array_equal(log["interest"], expected.astype(np.float32))
    # with impressions independent of taste, about top_k / num_categories of rows are interesting
    assert log["interest"].mean() == pytest.approx(2 / 10, abs=0.03)


@pytest.mark.parametrize("p", [-1.0, -0.3, 0.0, 0.6, 1.0])
def test_latent_signal_directions_have_the_configured_cosine(p):
    w = signal_directions(8, {"like": p, "watch_time": -0.5}, np.random.default_rng(0))
    assert np.allclose(np.linalg.norm(w, axis=0), 1.0)
    assert w[:, 0] @ w[:, 1] == pytest.approx(p, abs=1e-12)
    assert w[:, 0] @ w[:, 2] == pytest.approx(-0.5, abs=1e-12)
    assert np.allclose(w[:, 0], 1 / np.sqrt(8))  # click's score is the latent match u·v / sqrt(d)


def test_correlation_knob_moves_the_label_correlation():
    def label_corr(p: float) -> tuple[float, float]:
        log = generate(WorldConfig(**SMALL, correlation={"like": p, "watch_time": p}))["log"]
        clicked = log["click"] == 1
        return (
            float(np.corrcoef(log["click"], log["like"])[0, 1]),
            float(log["watch_time"][clicked].mean()),  # long watches follow clicks more as p grows
        )

    low, mid, high = label_corr(-0.9), label_corr(0.0), label_corr(0.9)
    assert low[0] < mid[0] < high[0]
    assert low[1] < mid[1] < high[1]
    assert high[0] - low[0] > 0.15


def test_zipf_popularity_concentrates_impressions():
    def top_decile_share(alpha: float) -> float:
        log = generate(WorldConfig(**{**SMALL, "num_items": 1000}, popularity_exponent=alpha))["log"]
        counts = np.sort(np.bincount(log["item_id"], minlength=1001)[1:])[::-1]
        return counts[:100].sum() / counts.sum()

    assert top_decile_share(1.0) > 0.5  # the top 10% of items get most impressions
    assert top_decile_share(0.0) < 0.15  # uniform exposure: about their 10% share


def r_squared(content: np.ndarray, factors: np.ndarray) -> float:
    """Share of the factors' variance a least-squares linear map from the content vectors explains."""
    x = np.column_stack([content, np.ones(len(content))])
    beta, *_ = np.linalg.lstsq(x, factors, rcond=None)
    residual = factors - x @ beta
    return 1 - (residual**2).sum() / ((factors - factors.mean(0)) ** 2).sum()


def test_content_vectors_file_correlates_with_item_factors(tmp_path):
    sizes = {**SMALL, "num_items": 3000, "num_interactions": 1000}
    r2 = {}
    for strength in (0.0, 0.5, 0.9):
        dm = module(tmp_path, **sizes, content_dim=32, content_strength=strength)
        path = dm.content_vectors_path
        assert path.parent == tmp_path / "cache" and path.name.startswith("item_content-") and path.suffix == ".npy"
        vectors = np.load(path)
        assert vectors.shape == (3001, 32) and vectors.dtype == np.float32
        assert (vectors[0] == 0).all()  # row = item id; id 0 is the reserved unknown item
        r2[strength] = r_squared(vectors[1:], dm.world["items"]["factors"])
    assert len(set(tmp_path.joinpath("cache").iterdir())) == 3  # one file per content configuration
    assert r2[0.0] < 0.03
    assert r2[0.5] == pytest.approx(0.25, abs=0.04)
    assert r2[0.9] == pytest.approx(0.81, abs=0.04)


def test_explicit_content_vectors_path(tmp_path):
    target = tmp_path / "vectors" / "items.npy"
    dm = module(tmp_path, content_vectors_path=str(target), num_interactions=1000)
    assert dm.content_vectors_path == target and np.load(target).shape == (201, 16)


def test_next_positive_item_is_the_users_next_click():
    user = np.array([1, 2, 1, 1, 2, 1])
    item = np.array([10, 20, 11, 12, 21, 13])
    click = np.array([1, 0, 0, 1, 1, 0], dtype=bool)
    # user 1 rows 0,2,3,5 (clicks at 0 and 3); user 2 rows 1,4 (click at 4)
    assert next_positive_item(user, item, click).tolist() == [12, 21, 12, 0, 0, 0]
    log = generate(WorldConfig(**{**SMALL, "num_interactions": 2000}))["log"]
    for row in range(300):  # against a plain scan of the log
        later = np.flatnonzero((log["user_id"] == log["user_id"][row]) & (log["click"] == 1))
        later = later[later > row]
        assert log["next_item_id"][row] == (log["item_id"][later[0]] if len(later) else 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_users": 0}, r"data.num_users must be an integer >= 1, got 0"),
        ({"num_interactions": 2.5}, r"data.num_interactions must be an integer >= 1, got 2.5"),
        ({"num_interactions": 5}, r"data.split=random: 5 rows are too few for data.val_fraction=0.1"),
        ({"latent_dim": 2}, r"data.latent_dim must be an integer >= 3, got 2"),
        ({"content_dim": 4}, r"data.content_dim \(4\) must be >= data.latent_dim \(8\)"),
        ({"correlation": {"like": 1.5}}, r"data.correlation.like must be a number in \[-1, 1\], got 1.5"),
        ({"correlation": {"watch_time": -2}}, r"data.correlation.watch_time must be a number in \[-1, 1\], got -2"),
        ({"correlation": {"click": 0.5}}, r"unknown signal\(s\) \['click'\]"),
        (
            {"tasks": {"ctr": {"kind": "binary"}}},
            r"no signal 'ctr'; available signals: \['click', 'like', 'watch_time'",
        ),
        (
            {"tasks": {"w": {"kind": "binary", "label": "watch_time"}}},
            r"'watch_time' is regression.*must be regression",
        ),
        ({"content_strength": 1.2}, r"data.content_strength must be a number in \[0, 1\], got 1.2"),
        ({"click_rate": 1.0}, r"data.click_rate must be a number in \(0, 1\), got 1.0"),
        ({"noise_std": -1}, r"data.noise_std must be a finite number >= 0"),
        (
            {"interest_top_k": 11},
            r"data.interest_top_k must be an integer in \[1, 10\], got 11 \(at most data.num_categories\)",
        ),
        ({"split": "leave_last"}, r"data.split must be one of \['random', 'cold_user', 'cold_item', 'temporal'\]"),
        ({"split": "cold_user", "cold_fraction": 0}, r"data.cold_fraction must be a number in \(0, 1\)"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"must be < 1 \(the rest trains\)"),
        (
            {"tasks": {"n": {"kind": "binary", "label": "next_item"}}},
            r"signal 'next_item' is retrieval, so the task's kind must be retrieval, got 'binary'",
        ),
        (
            {"tasks": {"c": {"kind": "multiclass", "label": "click"}}},
            r"signal 'click' is binary, so the task's kind must be binary or regression, got 'multiclass'",
        ),
    ],
)
def test_bad_config_values(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        RecsysSyntheticDataModule(**{**SMALL, "cache_dir": str(tmp_path), **kwargs})


def test_a_task_may_rename_a_signal(tmp_path):
    dm = module(tmp_path, tasks={"ctr": {"kind": "binary", "label": "click"}, "dwell": {"kind": "regression",
                                 "label": "watch_time"}}, num_interactions=1000)  # fmt: skip
    assert torch.equal(
        torch.cat([s["labels"]["ctr"] for s in dm.splits.values()]).sort().values,
        torch.from_numpy(np.sort(dm.interactions["click"])),
    )


@pytest.mark.parametrize("split", ["random", "cold_user", "cold_item", "temporal"])
def test_split_modes(split, tmp_path):
    dm = module(tmp_path, split=split, cold_fraction=0.2, num_interactions=6000)
    s = dm.splits
    rows = torch.cat([p["timestamp"] for p in s.values()]).sort().values  # the splits partition the log
    assert torch.equal(rows, torch.from_numpy(dm.interactions["timestamp"]))
    assert all(bool((p["timestamp"].diff() >= 0).all()) for p in s.values())  # each split in time order
    if split == "temporal":
        assert s["train"]["timestamp"].max() <= s["val"]["timestamp"].min()
        assert s["val"]["timestamp"].max() <= s["test"]["timestamp"].min()
        assert {k: len(p["user_id"]) for k, p in s.items()} == {"train": 4800, "val": 600, "test": 600}
    if split.startswith("cold_"):
        key = f"{split[5:]}_id"
        train = set(s["train"][key].tolist())
        cold_val, cold_test = set(s["val"][key].tolist()) - train, set(s["test"][key].tolist()) - train
        assert cold_val and cold_test
        # the held-out ids, and perhaps a few rare warm ones whose rows all fell into val / test (test_splits.py
        # checks the held-out set exactly)
        assert len(cold_val | cold_test) >= round(0.2 * len(np.unique(dm.interactions[key])))
        assert dm.segments == ("warm", split)  # the base module reports both segments of val / test
        assert s["val"]["segments"][split].sum() == np.isin(s["val"][key], list(cold_val)).sum()
    # the split follows the dataset's seed, not the run's
    again = module(tmp_path / "again", split=split, cold_fraction=0.2, num_interactions=6000, shuffle_seed=5)
    assert torch.equal(again.splits["test"]["timestamp"], s["test"]["timestamp"])


def test_ids_item_info_and_catalog(tmp_path):
    dm = module(tmp_path, num_interactions=2000)
    spec, world = dm.feature_spec, dm.world
    assert spec.id_columns == {"user_id": "user_id", "item_id": "item_id"}
    assert dm.item_info.num_items == 200
    assert dm.item_info.category.tolist() == [0, *world["items"]["category"].tolist()]
    catalog = dm.catalog
    assert set(catalog.users) == {"user_id", "age_bucket", "region", "activity_level", "user_activity"}
    assert set(catalog.items) == {"item_id", "category", "price_bucket", "item_log_duration"}
    assert catalog.num_users == 300 and catalog.num_items == 200
    for side in (catalog.users, catalog.items):
        assert all(float(t[0]) == 0 for t in side.values())  # row 0: the unknown id
    # the tables rebuild every row's input from its ids
    for split in dm.splits.values():
        for j, col in enumerate(spec.categorical):
            table = catalog.users.get(col, catalog.items.get(col))
            key = "user_id" if col in catalog.users else "item_id"
            assert torch.equal(table[split[key]], split["features"]["categorical"][:, j]), col
        for j, col in enumerate(spec.numeric):
            table = catalog.users.get(col, catalog.items.get(col))
            key = "user_id" if col in catalog.users else "item_id"
            assert torch.equal(table[split[key]], split["features"]["numeric"][:, j]), col
    assert torch.equal(catalog.train_item_id, dm.splits["train"]["item_id"])
    assert torch.equal(catalog.train_user_id, dm.splits["train"]["user_id"])


NEXT = {"click": {"kind": "binary"}, "next_item": {"kind": "retrieval"}}


def test_next_item_is_a_retrieval_label(tmp_path):
    dm = module(tmp_path, tasks=NEXT, num_interactions=3000)
    labels = torch.cat([p["labels"]["next_item"] for p in dm.splits.values()])
    assert labels.dtype == torch.int64
    assert torch.equal(labels.sort().values, torch.from_numpy(np.sort(dm.interactions["next_item_id"])))
    assert (labels == 0).any() and (labels > 0).sum() > 1000  # most rows have a next click; the last ones none


def test_cold_item_split_never_trains_a_held_out_item(tmp_path):
    dm = module(tmp_path, tasks=NEXT, split="cold_item", cold_fraction=0.3, num_interactions=6000)
    train = dm.splits["train"]
    seen = torch.unique(train["item_id"])
    targets = train["labels"]["next_item"]
    assert torch.isin(targets[targets > 0], seen).all()  # not even as a next-item target
    held_out = torch.cat([dm.splits[k]["item_id"] for k in ("val", "test")])
    held_out = held_out[~torch.isin(held_out, seen)].unique()
    # each training row's label is the log's next item, or 0 where that item is held out
    log = dm.interactions

    def keys(t: dict) -> list[tuple]:  # (user, item, timestamp) names a row of this log
        cols = [np.asarray(t[k]).tolist() for k in ("user_id", "item_id", "timestamp")]
        return list(zip(*cols, strict=True))

    row_of = {k: r for r, k in enumerate(keys(log))}
    rows = [row_of[k] for k in keys(train)]
    original = torch.from_numpy(log["next_item_id"][rows])
    expected = torch.where(torch.isin(original, held_out), 0, original)
    assert torch.equal(targets, expected) and not torch.equal(targets, original)
    val_targets = dm.splits["val"]["labels"]["next_item"]
    assert torch.isin(val_targets, held_out).any()  # evaluation still asks for cold items


def test_trains_end_to_end_and_is_tracked(train_run, tmp_path):
    run = train_run(
        "data=recsys_synthetic",
        *RECSYS_TINY,
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=3",
        "trainer.log_every_n_steps=5",
        metrics=[*(f"test/{task}/auroc" for task in ("click", "like", "interest")), "test/watch_time/mse"],
    )
    assert run.data.metrics["test/click/auroc"] > 0.7  # learnable: the features' effects and the ids' latent match


def test_bad_value_stops_the_run_before_tracking(make_cfg, mlflow_runs, tmp_path):
    with pytest.raises(ConfigError, match="available signals"):
        train(make_cfg("data=recsys_synthetic", "+data.tasks.clicks={kind: binary}", tiny=False))
    assert mlflow_runs() == []
