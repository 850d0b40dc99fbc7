"""data=tabular: a user's CSV or Parquet file, described by config only."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtl_experiments.data.tabular import TabularFileDataModule
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.pipeline import train
from tests.conftest import TABULAR_CONFIG
from tests.fixtures_data import tabular_frame, write_tabular_file

COLUMNS = dict(
    categorical=["city", "device"], numeric=["age", "price"], id_columns={"user_id": "user", "item_id": "item"}
)
TASKS = {"click": {"kind": "binary"}, "watch": {"kind": "regression", "label": "watch_seconds"}}


def module(path: Path, **kwargs) -> TabularFileDataModule:
    dm = TabularFileDataModule(**{"tasks": TASKS, "path": str(path), **COLUMNS, **kwargs})
    dm.setup()
    return dm


def test_csv_round_trip(tabular_csv):
    dm = module(tabular_csv, val_fraction=0.2, test_fraction=0.1)
    spec = dm.feature_spec
    assert list(spec.categorical) == ["user", "item", "city", "device"]  # id columns first
    assert spec.numeric == ("age", "price")
    assert {k: len(s["user_id"]) for k, s in dm.splits.items()} == {"train": 210, "val": 60, "test": 30}

    frame = tabular_frame()
    order = np.random.default_rng(0).permutation(300)
    rows = {"val": np.sort(order[:60]), "test": np.sort(order[60:90]), "train": np.sort(order[90:])}
    train_rows = frame.iloc[rows["train"]]
    assert spec.id_columns == {"user_id": "user", "item_id": "item"}
    for split, idx in rows.items():
        part, s = frame.iloc[idx], dm.splits[split]
        assert np.array_equal(s["labels"]["click"].numpy(), part["click"].to_numpy(np.float32))
        assert np.allclose(s["labels"]["watch"].numpy(), part["watch_seconds"].to_numpy(np.float32))
        cat = s["features"]["categorical"]
        assert torch.equal(s["user_id"], cat[:, 0]) and torch.equal(s["item_id"], cat[:, 1])
        # vocabularies from the training rows (the id columns': from every row): ids 1..K in sorted order, 0 for
        # missing and unseen values
        for j, col in enumerate(spec.categorical):
            vocab = sorted((frame if col in ("user", "item") else train_rows)[col].dropna().astype(str).unique())
            assert dm.vocabularies[col] == vocab
            expected = [vocab.index(str(v)) + 1 if pd.notna(v) and str(v) in vocab else 0 for v in part[col]]
            assert cat[:, j].tolist() == expected, col
        # numeric standardised with the training mean / std; missing -> the mean (0)
        for j, col in enumerate(spec.numeric):
            mean, std = train_rows[col].mean(), train_rows[col].std(ddof=0)
            want = ((part[col].fillna(mean) - mean) / std).to_numpy(np.float32)
            assert np.allclose(s["features"]["numeric"][:, j].numpy(), want, atol=1e-5), col
    assert (dm.splits["train"]["features"]["categorical"][:, 3] == 0).sum() > 0  # device is missing every 7th row
    assert (dm.splits["train"]["features"]["numeric"][:, 0] == 0).sum() >= 20  # age is missing every 10th row


def test_parquet_gives_the_same_tensors_as_csv(tmp_path, tabular_csv):
    parquet = write_tabular_file(tmp_path / "t.parquet")
    a, b = module(tabular_csv), module(parquet)
    for split in ("train", "val", "test"):
        sa, sb = a.splits[split], b.splits[split]
        assert torch.equal(sa["features"]["categorical"], sb["features"]["categorical"])
        assert torch.equal(sa["features"]["numeric"], sb["features"]["numeric"])
        assert all(torch.equal(sa["labels"][t], sb["labels"][t]) for t in TASKS)
    assert a.vocabularies == b.vocabularies


def test_tsv_gzip_and_separate_split_files(tmp_path):
    frame = tabular_frame()
    train_file = tmp_path / "train.tsv.gz"
    with gzip.open(train_file, "wt") as f:
        frame.iloc[:200].to_csv(f, sep="\t", index=False)
    val = write_tabular_file(tmp_path / "val.csv", frame.iloc[200:250].assign(city="Lima"))  # never seen in training
    dm = module(train_file, val_path=str(val), test_fraction=0.25)
    assert {k: len(s["user_id"]) for k, s in dm.splits.items()} == {"train": 150, "val": 50, "test": 50}
    assert (dm.splits["val"]["features"]["categorical"][:, 2] == 0).all()  # unseen city -> id 0
    test = write_tabular_file(tmp_path / "test.parquet", frame.iloc[250:])
    dm = module(train_file, val_path=str(val), test_path=str(test))  # no fractions: the whole file trains
    assert {k: len(s["user_id"]) for k, s in dm.splits.items()} == {"train": 200, "val": 50, "test": 50}


def test_binary_labels_may_be_true_false(tmp_path):
    path = write_tabular_file(tmp_path / "b.csv", tabular_frame().assign(click=lambda f: f["click"].astype(bool)))
    dm = module(path)
    assert set(dm.splits["train"]["labels"]["click"].unique().tolist()) == {0.0, 1.0}


def write_csv(tmp_path: Path, **changes) -> Path:
    frame = tabular_frame()
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    return write_tabular_file(tmp_path / "bad.csv", frame)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"click": (4, 2)}, r"bad.csv: task 'click' is binary but its label column 'click' has 1 value\(s\) other "
                            r"than 0/1, e.g. '?2'? on data row 5; map the column to 0/1"),
        ({"click": (0, "yes")}, r"task 'click' is binary .* e.g. 'yes' on data row 1"),
        ({"watch_seconds": (9, "long")}, r"bad.csv: task 'watch' is regression but its label column 'watch_seconds' "
                                         r"has 1 non-numeric or infinite value\(s\), e.g. 'long' on data row 10"),
        ({"click": (7, None)}, r"bad.csv: label column 'click' \(task 'click'\) has 1 missing value\(s\), the first "
                               r"on data row 8; drop those rows or fill the labels"),
        ({"price": (3, "cheap")}, r"bad.csv: numeric column 'price' has the non-numeric value 'cheap' on data row 4"),
    ],
)  # fmt: skip
def test_bad_values_name_file_column_and_row(changes, message, tmp_path):
    with pytest.raises(DataError, match=message):
        module(write_csv(tmp_path, **changes), val_fraction=0.01, test_fraction=0.01)


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"Data file not found: .*nope.csv. Check data.path"):
        module(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty.csv is empty \(not even a header row\)"):
        module(tmp_path / "empty.csv")
    (tmp_path / "header.csv").write_text("user,item,city,device,age,price,click,watch_seconds\n")
    with pytest.raises(DataError, match=r"header.csv has a header but no data rows"):
        module(tmp_path / "header.csv")
    write_tabular_file(tmp_path / "few.csv", tabular_frame().drop(columns=["device", "price"]))
    listed = r"its columns are \['user', 'item', 'city', 'age', 'click', 'watch_seconds'\]"
    with pytest.raises(
        DataError, match=r"few.csv has no column\(s\) \['device', 'price'\] named in the data config; " + listed
    ):
        module(tmp_path / "few.csv")
    (tmp_path / "data.json").write_text("{}")
    with pytest.raises(DataError, match=r"unknown file type .json; .* must end in .csv, .tsv"):
        module(tmp_path / "data.json")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"Cannot read .*broken.parquet as PARQUET"):
        module(tmp_path / "broken.parquet")
    write_tabular_file(tmp_path / "tiny.csv", tabular_frame().iloc[:5])
    with pytest.raises(DataError, match=r"tiny.csv: data.split=random: 5 rows are too few for data.val_fraction=0.1"):
        module(tmp_path / "tiny.csv")
    with pytest.raises(DataError, match=r"tiny.csv has 5 rows: too few for data.test_fraction=0.1 .* data.test_path"):
        module(tmp_path / "tiny.csv", val_path=str(tmp_path / "tiny.csv"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": None}, r"data.path is required for data=tabular"),
        ({"tasks": None}, r"data.tasks is required for data=tabular"),
        ({"categorical": ["city", "click"]}, r"Task label column\(s\) \{'click': 'click'\} are also input columns"),
        ({"numeric": ["age", "city"]}, r"Column\(s\) \['city'\] are listed more than once"),
        ({"categorical": ["user"]}, r"Column\(s\) \['user'\] are listed more than once"),
        ({"id_columns": {"session": "s"}}, r"data.id_columns has unknown role\(s\) \['session'\]"),
        ({"categorical": [], "numeric": [], "id_columns": {}}, r"needs at least one input column"),
        ({"numeric": "age"}, r"data.numeric must be a list of column names"),
        ({"val_fraction": 0.7, "test_fraction": 0.3}, r"data.val_fraction \+ data.test_fraction must be < 1"),
        ({"val_path": "v.csv", "test_fraction": 1.0}, r"data.test_fraction must be a number in \(0, 1\), got 1.0"),
        ({"split": "by_user"}, r"data.split must be one of \['random', 'cold_user', 'cold_item', 'temporal'\]"),
        ({"split": "cold_user", "id_columns": {"item_id": "item"}}, r"needs data.id_columns.user_id=<column>"),
        ({"split": "cold_item", "cold_fraction": 1.5}, r"data.cold_fraction must be a number in \(0, 1\)"),
        ({"split": "temporal"}, r"data.split=temporal orders the rows by time: set data.timestamp_column"),
        ({"split": "cold_item", "val_path": "v.csv"}, r"data.val_path and data.test_path must be null"),
        (
            {"tasks": {"next": {"kind": "retrieval"}}, "id_columns": {"user_id": "user"}},
            r"Retrieval task\(s\) \['next'\] name items, so data=tabular needs the item id column",
        ),
    ],
)
def test_bad_config(kwargs, message, tabular_csv):
    options = {"tasks": TASKS, "path": str(tabular_csv), **COLUMNS, **kwargs}
    with pytest.raises(ConfigError, match=message):
        TabularFileDataModule(**options)


def test_ids_span_every_split_other_vocabularies_only_training(tmp_path):
    frame = tabular_frame()
    new = frame.iloc[250:].assign(user="newcomer", item=5000, city="Lima")  # none of these occur in training
    train, val = (
        write_tabular_file(tmp_path / "train.csv", frame.iloc[:250]),
        write_tabular_file(tmp_path / "v.csv", new),
    )
    dm = module(train, val_path=str(val), test_fraction=0.2)
    users, items = dm.vocabularies["user"], dm.vocabularies["item"]
    assert "newcomer" in users and "5000" in items and "Lima" not in dm.vocabularies["city"]
    v = dm.splits["val"]
    assert (v["user_id"] == users.index("newcomer") + 1).all() and (v["item_id"] == items.index("5000") + 1).all()
    assert (v["features"]["categorical"][:, 2] == 0).all()  # an unseen city is still id 0
    assert not torch.isin(v["user_id"], dm.seen_ids()["user_id"]).any()  # a cold user, with an id of its own
    assert dm.feature_spec.categorical["user"] == len(users) + 1 == 42
    assert dm.item_info.num_items == len(items) == 31


def with_time(frame: pd.DataFrame, dates: bool = False) -> pd.DataFrame:
    seconds = np.random.default_rng(1).integers(0, 50, len(frame)) * 3600  # many rows share an hour
    when = pd.Timestamp("2024-05-01") + pd.to_timedelta(seconds, unit="s")
    return frame.assign(ts=when.strftime("%Y-%m-%d %H:%M:%S") if dates else seconds)


@pytest.mark.parametrize("split", ["cold_user", "cold_item", "temporal"])
def test_split_modes(split, tmp_path):
    path = write_tabular_file(tmp_path / "t.csv", with_time(tabular_frame(), dates=split == "temporal"))
    options = dict(split=split, cold_fraction=0.25, timestamp_column="ts", val_fraction=0.1, test_fraction=0.2)
    dm = module(path, **options)
    s = dm.splits
    assert sum(len(p["user_id"]) for p in s.values()) == 300
    if split == "temporal":  # date-times become seconds since 1970; train on the past
        assert s["train"]["timestamp"].dtype == torch.int64 and int(s["train"]["timestamp"].min()) >= 1714521600
        assert s["train"]["timestamp"].max() <= s["val"]["timestamp"].min()
        assert s["val"]["timestamp"].max() <= s["test"]["timestamp"].min()
        assert {k: len(p["user_id"]) for k, p in s.items()} == {"train": 210, "val": 30, "test": 60}
    else:
        key = f"{split[5:]}_id"
        train = set(s["train"][key].tolist())
        cold = {k: set(s[k][key].tolist()) - train for k in ("val", "test")}
        n_ids = {"user_id": 40, "item_id": 30}[key]
        assert cold["val"] and cold["test"] and len(cold["val"] | cold["test"]) >= round(0.25 * n_ids)
        assert 0 not in cold["val"] | cold["test"]  # held-out ids keep their own ids
        # the timestamp column travels with every mode
        ts = torch.cat([p["timestamp"] for p in s.values()]).sort().values
        assert torch.equal(ts, torch.from_numpy(np.sort(with_time(tabular_frame())["ts"].to_numpy())))
    again = module(path, **options)
    assert all(torch.equal(again.splits[k]["user_id"], s[k]["user_id"]) for k in s)  # seeded by split_seed
    other = module(path, **options, split_seed=1)
    assert split == "temporal" or not torch.equal(other.splits["val"]["user_id"], s["val"]["user_id"])


def test_bad_timestamps_and_too_few_ids(tmp_path):
    frame = with_time(tabular_frame()).astype({"ts": object})
    frame.loc[6, "ts"] = "soon"
    path = write_tabular_file(tmp_path / "t.csv", frame)
    with pytest.raises(DataError, match=r"t.csv: timestamp column 'ts' holds numbers but has the value 'soon' on data "
                                        r"row 7"):  # fmt: skip
        module(path, split="temporal", timestamp_column="ts")
    dates = with_time(tabular_frame(), dates=True)
    dates.loc[8, "ts"] = "next tuesday"
    path = write_tabular_file(tmp_path / "d.csv", dates)
    with pytest.raises(DataError, match=r"d.csv: timestamp column 'ts' has the value 'next tuesday' on data row 9, "
                                        r"neither a number nor a date-time"):  # fmt: skip
        module(path, split="temporal", timestamp_column="ts")
    with pytest.raises(DataError, match=r"d.csv: data.split=cold_item: 30 items are too few to hold out 30"):
        module(path, split="cold_item", cold_fraction=0.99)


def with_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Adds ``rating`` (integer classes 0..4), ``genre`` (text classes) and ``next_item`` (the user's next item,
    empty for a user's last row; some next items, 9000+, never appear in the item column)."""
    nxt = frame.groupby("user")["item"].shift(-1)
    nxt = nxt.where(frame.index % 25 != 3, 9000 + frame.index % 2)
    return frame.assign(
        rating=(frame["price"] // 10).clip(0, 4).astype(int),
        genre=np.where(frame["price"] > 20, "drama", np.where(frame["price"] > 10, "comedy", "action")),
        next_item=nxt.astype("Int64"),
    )


LABEL_TASKS = {
    "rating": {"kind": "multiclass"},
    "genre": {"kind": "multiclass"},
    "next": {"kind": "retrieval", "label": "next_item"},
}


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_multiclass_and_retrieval_labels(suffix, tmp_path):
    frame = with_labels(tabular_frame())
    dm = module(write_tabular_file(tmp_path / f"t{suffix}", frame), tasks=LABEL_TASKS)
    assert dm.tasks["rating"].num_classes == 5 and dm.tasks["genre"].num_classes == 3
    assert dm.label_classes == {"genre": ["action", "comedy", "drama"]}  # text classes in sorted order
    items = dm.vocabularies["item"]
    assert "9000" in items and "9001" in items  # next items outside the item column get ids of their own
    order = np.random.default_rng(0).permutation(300)
    for split, rows in (("val", order[:30]), ("test", order[30:60]), ("train", order[60:])):
        part, labels = frame.iloc[np.sort(rows)], dm.splits[split]["labels"]
        assert all(labels[t].dtype == torch.int64 for t in LABEL_TASKS)
        assert labels["rating"].tolist() == part["rating"].tolist()
        assert labels["genre"].tolist() == [["action", "comedy", "drama"].index(g) for g in part["genre"]]
        want = [0 if pd.isna(v) else items.index(str(v)) + 1 for v in part["next_item"]]  # empty: no label
        assert labels["next"].tolist() == want
    assert (dm.splits["train"]["labels"]["next"] == 0).any()


def test_bad_class_labels(tmp_path):
    frame = with_labels(tabular_frame())
    train = write_tabular_file(tmp_path / "train.csv", frame.iloc[:200])
    odd = frame.iloc[200:].assign(genre="horror")
    val = write_tabular_file(tmp_path / "val.csv", odd)
    with pytest.raises(DataError, match=r"val.csv: task 'genre' has the class 'horror' on data row 1, which no train"):
        module(train, val_path=str(val), tasks={"genre": {"kind": "multiclass"}})
    val = write_tabular_file(tmp_path / "val.csv", frame.iloc[200:].assign(rating=-1))
    with pytest.raises(DataError, match=r"val.csv: task 'rating' is multiclass with integer classes .* value -1"):
        module(train, val_path=str(val), tasks={"rating": {"kind": "multiclass"}})
    with pytest.raises(DataError, match=r"num_classes=2, but its label column 'genre' has 3 classes \['action'"):
        module(train, tasks={"genre": {"kind": "multiclass", "num_classes": 2}})
    missing = write_tabular_file(tmp_path / "m.csv", frame.astype({"rating": object}).assign(rating=None))
    with pytest.raises(
        DataError,
        match=r"m.csv: label column 'rating' \(task 'r'\) has 240 missing value\(s\), the first on data row 2",
    ):
        module(missing, tasks={"r": {"kind": "multiclass", "label": "rating"}})


def test_trains_end_to_end_and_is_tracked(make_cfg, mlflow_runs, tabular_csv):
    trainer = ["trainer.max_epochs=3", "trainer.log_every_n_steps=2", "trainer.enable_model_summary=false"]
    cfg = make_cfg(
        "data=tabular", f"data.path={tabular_csv}", *TABULAR_CONFIG, "data.batch_size=16", "optimizer.lr=0.01",
        *trainer, "~callbacks.progress_bar", tiny=False,
    )  # fmt: skip
    train(cfg)
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["test/click/auroc"] > 0.75  # click follows city and age
    assert "test/watch/mse" in m


def test_cold_user_split_with_class_and_item_tasks_trains(make_cfg, mlflow_runs, tmp_path):
    path = write_tabular_file(tmp_path / "t.parquet", with_labels(with_time(tabular_frame())))
    tasks = "{click: {kind: binary}, genre: {kind: multiclass, top_k: 2}, next: {kind: retrieval, label: next_item}}"
    cfg = make_cfg(
        "data=tabular", f"data.path={path}", *TABULAR_CONFIG[:3], f"data.tasks={tasks}", "data.split=cold_user",
        "data.cold_fraction=0.3", "data.timestamp_column=ts", "data.batch_size=32", "trainer.max_epochs=1",
        "trainer.enable_model_summary=false", "~callbacks.progress_bar", tiny=False,
    )  # fmt: skip
    train(cfg)
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("test/click/auroc", "test/click/gauc", "test/genre/accuracy", "test/next/ndcg_10", "test/next/mrr"):
        assert key in m, sorted(m)


def test_missing_path_stops_before_tracking(make_cfg, mlflow_runs):
    with pytest.raises(ConfigError, match="data.path is required"):
        train(make_cfg("data=tabular", tiny=False))
    assert mlflow_runs() == []
