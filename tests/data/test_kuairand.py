"""KuaiRand: parsing of the published CSV files (logs, user and video features), signals, ids over the catalogue,
log selection, splits, the catalogue tables, the cache, errors, and one training run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtl_experiments.data import kuairand
from mtl_experiments.data.kuairand import BINARY, USER_CATEGORICAL, VIDEO_CATEGORICAL, KuaiRandDataModule
from mtl_experiments.errors import ConfigError, DataError
from tests.fixtures_data import kuairand_frames, write_kuairand

TASKS = {
    "click": {"kind": "binary"},
    "like": {"kind": "binary"},
    "long_view": {"kind": "binary"},
    "play_time": {"kind": "regression"},
    "next_item": {"kind": "retrieval"},
}
STANDARD = ("log_standard_4_08_to_4_21_pure.csv", "log_standard_4_22_to_5_08_pure.csv")
RANDOM = "log_random_4_22_to_5_08_pure.csv"


def module(root: Path, tmp_path: Path, tasks=TASKS, **kwargs) -> KuaiRandDataModule:
    dm = KuaiRandDataModule(tasks=tasks, root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup()
    return dm


def whole(dm) -> dict:
    """The three splits concatenated, with the raw user / video ids and the split of each row."""
    parts = [dm.splits[s] for s in ("train", "val", "test")]
    out = {k: torch.cat([p[k] for p in parts]) for k in ("user_id", "item_id", "timestamp")}
    out |= {f"label/{t}": torch.cat([p["labels"][t] for p in parts]) for t in dm.tasks}
    out["categorical"] = torch.cat([p["features"]["categorical"] for p in parts])
    out["numeric"] = torch.cat([p["features"]["numeric"] for p in parts])
    out["raw_user"] = dm.raw_ids["user_id"][out["user_id"] - 1]
    out["raw_video"] = dm.raw_ids["video_id"][out["item_id"] - 1]
    return out


def log_in_time_order(frames: dict, names=STANDARD) -> pd.DataFrame:
    """The logs concatenated in the given order, stably sorted by time_ms (ties: file order)."""
    df = pd.concat([frames[n] for n in names], ignore_index=True)
    return df.iloc[np.argsort(df["time_ms"].to_numpy(), kind="stable")].reset_index(drop=True)


@pytest.fixture
def kr(tmp_path):
    frames = kuairand_frames()
    return write_kuairand(tmp_path / "kr", frames), frames


def by_row(rows: dict) -> dict:
    """(raw user, raw video, time_ms) -> row index (unique in the fixture apart from the equal timestamps)."""
    keys = zip(rows["raw_user"].tolist(), rows["raw_video"].tolist(), rows["timestamp"].tolist(), strict=True)
    return {k: i for i, k in enumerate(keys)}


def test_signals_and_ids_match_the_log_files(kr, tmp_path):
    root, frames = kr
    dm = module(root, tmp_path)
    rows = whole(dm)
    log = log_in_time_order(frames)
    assert len(rows["user_id"]) == len(log)
    index = by_row(rows)
    order = [index[k] for k in zip(log["user_id"], log["video_id"], log["time_ms"], strict=True)]
    for task, column in (("click", "is_click"), ("like", "is_like"), ("long_view", "long_view")):
        assert rows[f"label/{task}"][order].tolist() == log[column].astype(float).tolist()
    expected = np.log1p(log["play_time_ms"].to_numpy() / 1000)
    assert np.allclose(rows["label/play_time"][order].numpy(), expected, atol=1e-5)
    assert dm.splits["train"]["labels"]["next_item"].dtype == torch.long
    spec = dm.feature_spec
    assert spec.id_columns == {"user_id": "user_id", "item_id": "video_id"}
    # users: every user of the user features file (also the one without logs); videos: those of the logs read
    assert dm.raw_ids["user_id"].tolist() == sorted(frames["user_features_pure.csv"]["user_id"])
    assert dm.raw_ids["video_id"].tolist() == sorted(set(log["video_id"]))
    assert spec.categorical["video_id"] == dm.item_info.num_items + 1 == len(set(log["video_id"])) + 1
    assert list(spec.categorical) == ["user_id", *USER_CATEGORICAL, "video_id", *VIDEO_CATEGORICAL]
    assert spec.numeric == ("log_duration",)


def test_next_item_is_the_users_next_clicked_video(kr, tmp_path):
    root, frames = kr
    for signal in ("click", None):
        dm = module(root, tmp_path, next_item_signal=signal)
        rows = whole(dm)
        log = log_in_time_order(frames)
        video_id = {raw: k for k, raw in enumerate(dm.raw_ids["video_id"].tolist(), start=1)}
        positive = log["is_click"].to_numpy() == 1 if signal else np.ones(len(log), bool)
        expected = np.zeros(len(log), np.int64)
        for _, group in log.groupby("user_id", sort=False):
            idx = group.index.to_numpy()  # time order
            nxt = 0
            for r in idx[::-1]:
                expected[r] = nxt
                if positive[r]:
                    nxt = video_id[log["video_id"][r]]
        index = by_row(rows)
        order = [index[k] for k in zip(log["user_id"], log["video_id"], log["time_ms"], strict=True)]
        assert rows["label/next_item"][order].tolist() == expected.tolist()
        assert 0 < (expected == 0).sum() < len(expected)


def test_user_and_video_features_are_encoded_from_the_csv_files(kr, tmp_path):
    root, frames = kr
    dm = module(root, tmp_path)
    cat, spec = dm.catalog, dm.feature_spec
    users, videos = frames["user_features_pure.csv"], frames["video_features_basic_pure.csv"]
    train_users = set(dm.splits["train"]["user_id"].tolist())
    for u in range(1, cat.num_users + 1):
        raw = users[users["user_id"] == int(dm.raw_ids["user_id"][u - 1])].iloc[0]
        for c in ("follow_user_num_range", "onehot_feat3", "user_active_degree"):  # quoted "(0,10]"; empty fields
            value = None if pd.isna(raw[c]) else str(raw[c])
            vocab = dm.vocabularies[c]
            assert cat.users[c][u].item() == (vocab.index(value) + 1 if value in vocab else 0), (u, c)
    assert "(0,10]" in dm.vocabularies["follow_user_num_range"] and "" not in dm.vocabularies["onehot_feat3"]
    assert any(cat.users["onehot_feat3"][u] == 0 for u in train_users)  # a missing value is id 0
    # videos: the first tag of "7,16" is the tag feature and the item category
    mean, std = dm.numeric_stats["log_duration"]
    for k in range(1, cat.num_items + 1):
        raw = videos[videos["video_id"] == int(dm.raw_ids["video_id"][k - 1])].iloc[0]
        tag, vocab = raw["tag"].split(",")[0], dm.vocabularies["tag"]
        assert cat.items["tag"][k].item() == (vocab.index(tag) + 1 if tag in vocab else 0)
        ms = raw["video_duration"]
        if math.isnan(ms):  # no duration in the video features: the logs' duration_ms of that video
            log = pd.concat([frames[n] for n in STANDARD])
            ms = log.loc[log["video_id"] == raw["video_id"], "duration_ms"].mean()
        assert cat.items["log_duration"][k].item() * std + mean == pytest.approx(math.log1p(ms / 1000), rel=1e-4)
    assert dm.item_info.category is not None and dm.item_info.category.shape == (cat.num_items + 1,)
    assert spec.categorical["author_id"] == len(dm.vocabularies["author_id"]) + 1


def test_catalog_rows_rebuild_every_rows_features(kr, tmp_path):
    root, _ = kr
    dm = module(root, tmp_path)
    split = dm.splits["test"]
    for r in range(0, len(split["user_id"]), 11):
        f = dm.catalog.features(int(split["user_id"][r]), split["item_id"][r : r + 1])
        assert torch.equal(f["categorical"][0], split["features"]["categorical"][r])
        assert torch.equal(f["numeric"][0], split["features"]["numeric"][r])
    assert torch.equal(dm.catalog.train_item_id, dm.splits["train"]["item_id"])


def test_log_selection_and_item_catalogue(kr, tmp_path):
    root, frames = kr
    n_standard = sum(len(frames[n]) for n in STANDARD)
    rows = {
        logs if isinstance(logs, str) else "list": sum(
            len(s["user_id"]) for s in module(root, tmp_path, logs=logs).splits.values()
        )
        for logs in ("standard", "random", "all", ["log_random_*.csv", str(root / RANDOM)])
    }
    assert rows == {"standard": n_standard, "random": len(frames[RANDOM]), "all": n_standard + len(frames[RANDOM]),
                    "list": len(frames[RANDOM])}  # fmt: skip
    every = module(root, tmp_path, item_catalog="features")
    assert every.raw_ids["video_id"].tolist() == sorted(frames["video_features_basic_pure.csv"]["video_id"])
    none = module(root, tmp_path, video_features=None)
    assert list(none.feature_spec.categorical)[-1] == "video_id" and none.item_info.category is None
    context = module(root, tmp_path, context_features=True)
    assert list(context.feature_spec.categorical)[-2:] == ["tab", "hour"] and context.catalog is None
    assert context.splits["train"]["features"]["categorical"][:, -1].max() <= 24


@pytest.mark.parametrize("split", ["random", "cold_user", "cold_item", "temporal"])
def test_every_split_mode(split, kr, tmp_path):
    root, frames = kr
    s = module(root, tmp_path, split=split, cold_fraction=0.2).splits
    assert sum(len(s[k]["user_id"]) for k in s) == sum(len(frames[n]) for n in STANDARD)
    key = {"cold_user": "user_id", "cold_item": "item_id"}.get(split)
    if key:
        seen = set(s["train"][key].tolist())
        assert set(s["val"][key].tolist()) - seen and set(s["test"][key].tolist()) - seen
    if split == "temporal":
        assert s["train"]["timestamp"].max() <= s["val"]["timestamp"].min()
        assert s["val"]["timestamp"].max() <= s["test"]["timestamp"].min()
    for k in s:
        assert torch.all(s[k]["timestamp"][1:] >= s[k]["timestamp"][:-1])


def test_second_setup_loads_the_cache_without_parsing(kr, tmp_path, monkeypatch):
    root, frames = kr
    first = module(root, tmp_path)
    assert len(list((tmp_path / "cache").glob("kuairand-*.pt"))) == 1

    def fail(path, *args, **kwargs):
        raise AssertionError(f"parsed {path} although the cache should have been used")

    monkeypatch.setattr(kuairand, "read_csv", fail)
    second = module(root, tmp_path, tasks={"click": {"kind": "binary"}})
    for split in ("train", "val", "test"):
        for key in ("numeric", "categorical"):
            assert torch.equal(first.splits[split]["features"][key], second.splits[split]["features"][key])
        assert torch.equal(first.splits[split]["labels"]["click"], second.splits[split]["labels"]["click"])
    assert second.feature_spec == first.feature_spec and second.vocabularies == first.vocabularies
    monkeypatch.undo()
    calls = []
    read = kuairand.read_csv
    monkeypatch.setattr(kuairand, "read_csv", lambda p, *a, **k: calls.append(p.name) or read(p, *a, **k))
    module(root, tmp_path, split="temporal")  # another config
    frames[STANDARD[0]].iloc[:-1].to_csv(root / STANDARD[0], index=False)  # the same name, other bytes
    module(root, tmp_path)
    assert calls.count(STANDARD[0]) == 2
    assert len(list((tmp_path / "cache").glob("kuairand-*.pt"))) == 3


def test_missing_files_name_the_path_and_kuairand(kr, tmp_path):
    root, _ = kr
    (root / "user_features_pure.csv").unlink()
    with pytest.raises(DataError) as e:
        module(root, tmp_path)
    assert "'user_features_*.csv'" in str(e.value) and str(root.resolve()) in str(e.value)
    assert "https://kuairand.com" in str(e.value)
    with pytest.raises(DataError, match=r"No file matches the log file \(data.logs\) 'log_standard_4_08_to_4_21_\*"):
        module(tmp_path / "empty", tmp_path)


def write_log_line(root: Path, line_no: int, text: str) -> None:
    """Replace line ``line_no`` (1-based, header = 1) of the first standard log with ``text``."""
    path = root / STANDARD[0]
    lines = path.read_text().splitlines()
    lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "line, edit, message",
    [
        (5, lambda f: f + ",7", r"4_21_pure.csv as a KuaiRand CSV file: .*Expected 19 fields in line 5, saw 20"),
        (7, lambda f: f.replace(",", ",x,", 1).rsplit(",", 1)[0], r"line 7: video_id is not a number: 'x'"),
        (4, lambda f: ",".join(["", *f.split(",")[1:]]), r"_pure.csv, line 4: user_id is missing"),
        (9, lambda f: ",".join([*f.split(",")[:5], "2", *f.split(",")[6:]]), r"line 9: is_click must be 0 or 1"),
    ],
)
def test_malformed_lines_name_the_file_and_the_line(line, edit, message, kr, tmp_path):
    root, _ = kr
    text = (root / STANDARD[0]).read_text().splitlines()[line - 1]
    write_log_line(root, line, edit(text))
    with pytest.raises(DataError, match=message):
        module(root, tmp_path)


def test_bad_feature_files(kr, tmp_path):
    root, frames = kr
    users = frames["user_features_pure.csv"]
    users.drop(columns=["register_days_range"]).to_csv(root / "user_features_pure.csv", index=False)
    with pytest.raises(DataError, match=r"user_features_pure.csv has no column\(s\) \['register_days_range'\]"):
        module(root, tmp_path)
    pd.concat([users, users.iloc[[2]]]).to_csv(root / "user_features_pure.csv", index=False)
    with pytest.raises(DataError, match=rf"user_features_pure.csv, line {len(users) + 2}: user_id 2 appears a second"):
        module(root, tmp_path)
    users.to_csv(root / "user_features_other.csv", index=False)
    with pytest.raises(DataError, match="matches 2 files"):
        module(root, tmp_path)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"no signal 'watch'; available signals: \['click', 'like'"):
        KuaiRandDataModule(tasks={"watch": {"kind": "binary"}})
    with pytest.raises(ConfigError, match="signal 'next_item' trains a task of kind retrieval"):
        KuaiRandDataModule(tasks={"next_item": {"kind": "binary"}})
    with pytest.raises(ConfigError, match="data.logs must be one of"):
        KuaiRandDataModule(logs="everything")
    with pytest.raises(ConfigError, match="data.user_features must name"):
        KuaiRandDataModule(user_features=None)
    with pytest.raises(ConfigError, match="data.item_catalog"):
        KuaiRandDataModule(item_catalog="all")
    with pytest.raises(ConfigError, match="needs data.video_features"):
        KuaiRandDataModule(item_catalog="features", video_features=None)
    with pytest.raises(ConfigError, match="next_item_signal"):
        KuaiRandDataModule(next_item_signal="is_click")
    with pytest.raises(ConfigError, match="cold_fraction"):
        KuaiRandDataModule(split="cold_item", cold_fraction=1.5)
    assert set(BINARY) <= set(kuairand.SIGNALS)


def test_trains_end_to_end_with_like_observed_after_a_click(train_run, tmp_path):
    root = write_kuairand(tmp_path / "kr")
    train_run(
        "data=kuairand",
        f"data.root={root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "+data.tasks.like.observed_if=click",
        "+data.tasks.next_item={kind: retrieval}",
        "data.split=temporal",
        "data.batch_size=64",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        metrics=("test/click/auroc", "test/like/auroc", "test/long_view/auroc", "test/play_time/mse",
                 "test/next_item/hitrate_10", "test/click/gauc"),
    )  # fmt: skip
