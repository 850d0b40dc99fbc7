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
from tests.conftest import TABULAR_CONFIG, tabular_frame, write_tabular_file

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
    for split, idx in rows.items():
        part, s = frame.iloc[idx], dm.splits[split]
        assert np.array_equal(s["labels"]["click"].numpy(), part["click"].to_numpy(np.float32))
        assert np.allclose(s["labels"]["watch"].numpy(), part["watch_seconds"].to_numpy(np.float32))
        cat = s["features"]["categorical"]
        assert torch.equal(s["user_id"], cat[:, 0]) and torch.equal(s["item_id"], cat[:, 1])
        # vocabularies from the training rows: ids 1..K in sorted order, 0 for missing and unseen values
        for j, col in enumerate(spec.categorical):
            vocab = sorted(train_rows[col].dropna().astype(str).unique())
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
    with pytest.raises(DataError, match=r"tiny.csv has 5 rows: too few for data.val_fraction=0.1"):
        module(tmp_path / "tiny.csv")


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
        ({"val_fraction": 0.7, "test_fraction": 0.3}, r"must be in \(0, 1\) and sum to < 1"),
    ],
)
def test_bad_config(kwargs, message, tabular_csv):
    options = {"tasks": TASKS, "path": str(tabular_csv), **COLUMNS, **kwargs}
    with pytest.raises(ConfigError, match=message):
        TabularFileDataModule(**options)


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


def test_missing_path_stops_before_tracking(make_cfg, mlflow_runs):
    with pytest.raises(ConfigError, match="data.path is required"):
        train(make_cfg("data=tabular", tiny=False))
    assert mlflow_runs() == []
