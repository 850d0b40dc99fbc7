"""The batch contract (mtl_experiments/data/spec.py) for every dataset: each ``conf/data/*.yaml`` enrols itself
(on its tiny fixture data from tests/conftest.py's ``tiny_data``), and every batch of every split is checked for
its keys, dtypes, shapes, label values and masks, id columns within their vocabularies, and segments."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from mtl_experiments.data.spec import ID_KEYS, LabelType, num_rows
from tests.conftest import options

BATCH_KEYS = {"features", "labels", "timestamp", "segments", *ID_KEYS}


@pytest.fixture(params=options("data"))
def datamodule(request, tiny_data, make_cfg):
    cfg = make_cfg(f"data={request.param}", *tiny_data(request.param), tiny=False)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    return dm


def batches(dm, split: str) -> list[dict]:
    loader = dm.train_dataloader() if split == "train" else getattr(dm, f"{split}_dataloader")()
    return list(loader)


def check_features(batch: dict, spec, rows: int) -> None:
    features = batch["features"]
    assert set(features) <= {"numeric", "categorical"}
    numeric = features.get("numeric")
    if numeric is None:
        assert spec.num_numeric == 0
    else:
        assert numeric.dtype == torch.float32 and tuple(numeric.shape) == (rows, spec.num_numeric)
        assert torch.isfinite(numeric).all()
    categorical = features.get("categorical")
    if categorical is None:
        assert spec.num_categorical == 0
        return
    assert categorical.dtype == torch.int64 and tuple(categorical.shape) == (rows, spec.num_categorical)
    cards = torch.tensor(list(spec.categorical.values()))
    assert (categorical >= 0).all() and (categorical < cards).all(), "an id outside its column's vocabulary"


def check_labels(dm, batch: dict, rows: int) -> None:
    labels = batch["labels"]
    assert list(labels) == list(dm.tasks)
    for name, task in dm.tasks.items():
        y = labels[name]
        assert tuple(y.shape) == (rows,) and y.dtype == task.label_type.dtype, (name, y.dtype, y.shape)
        if task.label_type is LabelType.BINARY:
            assert ((y == 0) | (y == 1)).all(), name
        elif task.label_type is LabelType.REAL:
            assert torch.isfinite(y).all(), name
        elif task.label_type is LabelType.CLASS:
            assert (y >= 0).all() and (y < task.num_classes).all(), name
        else:  # item ids 1..I, 0 = no label
            assert (y >= 0).all() and (y <= dm.item_info.num_items).all(), name
        mask = task.valid(y)
        if mask is not None:
            assert mask.dtype == torch.bool and tuple(mask.shape) == (rows,), name
        if task.observed_if is not None:  # its gate is a 0/1 label of the same rows
            assert dm.tasks[task.observed_if].label_type is LabelType.BINARY


def check_ids(dm, batch: dict, rows: int) -> None:
    spec = dm.feature_spec
    columns = list(spec.categorical)
    for key in ID_KEYS:
        if key not in batch:
            continue
        ids = batch[key]
        assert ids.dtype == torch.int64 and tuple(ids.shape) == (rows,), key
        if key in spec.id_columns:  # the id column is an input: the same ids, within its vocabulary
            column = spec.id_columns[key]
            assert torch.equal(ids, batch["features"]["categorical"][:, columns.index(column)]), key
            assert (ids >= 0).all() and (ids < spec.categorical[column]).all(), key
    if "timestamp" in batch:
        assert tuple(batch["timestamp"].shape) == (rows,)


def check_segments(dm, batch: dict, split: str, rows: int) -> None:
    segments = batch.get("segments")
    if segments is None:
        return
    assert split != "train" and set(segments) <= set(dm.segments)
    seen = dm.seen_ids()
    for name, mask in segments.items():
        assert mask.dtype == torch.bool and tuple(mask.shape) == (rows,), name
        if name.startswith("cold_"):  # cold_user / cold_item: the row's id never occurs in training
            key = f"{name[5:]}_id"
            assert not torch.isin(batch[key][mask], seen[key]).any(), name
    if "warm" in segments:  # user and item seen in training
        for key in seen:
            assert torch.isin(batch[key][segments["warm"]], seen[key]).all(), key


def test_every_batch_keeps_the_contract(datamodule):
    dm = datamodule
    assert dm.feature_spec is not None and set(dm.splits) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        total = 0
        for batch in batches(dm, split):
            assert {"features", "labels"} <= set(batch) <= BATCH_KEYS, set(batch)
            rows = next(iter(batch["labels"].values())).shape[0]
            assert 0 < rows <= (dm.batch_size if split == "train" else dm.eval_batch_size)
            check_features(batch, dm.feature_spec, rows)
            check_labels(dm, batch, rows)
            check_ids(dm, batch, rows)
            check_segments(dm, batch, split, rows)
            total += rows
        # every row, once (a streamed log keeps no split in memory, only its row counts)
        expected = dm.split_rows[split] if hasattr(dm, "split_rows") else num_rows(dm.splits[split])
        assert total == expected, split
