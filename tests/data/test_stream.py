"""data=stream (mtl_experiments/data/stream/): splits without an index, exactly-once division across ranks and
DataLoader workers with equal batch counts, seeded order, resume inside an epoch, the statistics cache, and bad
shards (one error naming the shard and the column; skip with a count). Data: scripts/make_log.py on tiny worlds."""

from __future__ import annotations

import gc
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_experiments.data.stream import StreamDataModule, allocator
from mtl_experiments.data.stream.loader import StreamLoader, interleaved_skip, tensors
from mtl_experiments.data.stream.shards import SPLIT_CODES
from mtl_experiments.errors import ConfigError, DataError
from scripts.make_log import write_log
from tests.conftest import CONF

WORLD = {"num_users": 150, "num_items": 60, "latent_dim": 4}


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory) -> Path:
    """2,000 rows in 3 shards of row groups of 300 rows."""
    out = tmp_path_factory.mktemp("stream") / "log"
    write_log(out, rows=2000, shards=3, seed=2, row_group=300, **WORLD)
    return out


def datamodule(path: Path, **overrides) -> StreamDataModule:
    cfg = OmegaConf.load(CONF / "data" / "stream.yaml")
    cfg.shuffle_seed = 0
    cfg.path = str(path)
    cfg.row_id_column = "row_id"
    cfg.batch_size = 64
    cfg.shuffle_buffer = 200
    cfg.merge_with(overrides)
    dm = instantiate(cfg, _convert_="all")
    dm.setup()
    return dm


def split_row_ids(dm: StreamDataModule, split: str) -> np.ndarray:
    """The row ids of ``split``, read independently: every shard whole, the split rule row by row."""
    ids = []
    for shard in dm.source.shards:
        table = pq.read_table(shard.path)
        codes = dm.source.split_rule.codes(table, shard, 0, dm.columns.timestamp)
        ids.append(table.column("row_id").to_numpy()[codes == SPLIT_CODES[split]])
    return np.sort(np.concatenate(ids))


def loader(dm, split="train", rank=0, world=1, workers=0, **kwargs) -> StreamLoader:
    size = dm.batch_size if split == "train" else dm.eval_batch_size
    return StreamLoader(dm.source, split, size, seed=3, shuffle=split == "train", rank=rank, world=world,
                        workers=workers, **kwargs)  # fmt: skip


def row_ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["row_id"]]


CHURN = """
import importlib.util, resource, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
if sys.argv[2] == "on":
    assert allocator.reuse_freed_memory()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for k in range(40):  # growing 4-6.5 MB buffers, each freed: a training step's temporaries
    buffer = bytearray(4 * 2**20 + k * 2**16)
    del buffer
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    """In a fresh interpreter (a test process's allocator has been warmed by everything before it): by default glibc
    maps each buffer above its threshold and unmaps it when freed, so every one is page-faulted in anew (~1,000-1,600
    faults each); with ``reuse_freed_memory`` the heap keeps them and only its growth faults."""

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", CHURN, allocator.__file__, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return int(run.stdout)

    default, reused = faults("off"), faults("on")
    assert default > 40 * 1000 and reused < default / 10


def test_a_kept_batch_does_not_keep_its_block_alive():
    block = np.arange(65536)  # a row group's rows; the batch is a slice of it
    alive = weakref.ref(block)
    batch = tensors({"labels": {"click": block[:64]}})
    del block
    gc.collect()
    assert alive() is None and batch["labels"]["click"].tolist() == list(range(64))


def test_splits_partition_the_rows_and_cold_users_never_train(log_dir):
    dm = datamodule(log_dir, split="cold_user", cold_fraction=0.2)
    parts = {s: split_row_ids(dm, s) for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 2000 == len(np.unique(np.concatenate(list(parts.values()))))
    assert {s: len(p) for s, p in parts.items()} == dm.split_rows
    seen = set(dm.seen_ids()["user_id"].tolist())
    for batch in loader(dm, "val"):
        cold = batch["segments"]["cold_user"]
        assert cold.any() and not any(int(u) in seen for u in batch["user_id"][cold])
        assert torch.equal(batch["segments"]["warm"], ~cold & dm.source.seen["item_id"][batch["item_id"]])
    temporal = datamodule(log_dir, split="temporal")
    last_train = max(int(b["timestamp"].max()) for b in loader(temporal, "train"))
    assert last_train < min(int(b["timestamp"].min()) for b in loader(temporal, "val"))


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (3, 0), (2, 2)])
def test_every_row_once_per_epoch_with_equal_batches_per_rank(log_dir, world, workers):
    dm = datamodule(log_dir)
    expected = split_row_ids(dm, "train")
    for epoch in (0, 1):
        seen, lengths = [], []
        for rank in range(world):
            ranked = loader(dm, rank=rank, world=world, workers=workers, epoch_fn=lambda e=epoch: e)
            batches = list(ranked)
            assert len(batches) == len(ranked) and all(len(b["row_id"]) <= 64 for b in batches)
            lengths.append(len(batches))
            seen += row_ids(batches)
        assert len(set(lengths)) == 1, lengths  # DDP never waits on a rank with fewer batches
        assert len(seen) == len(set(seen)) == len(expected) - len(expected) % world
        assert set(seen) <= set(expected.tolist())
    first, again = (row_ids(loader(dm, epoch_fn=lambda e=e: e)) for e in (0, 0))
    assert first == again and first != row_ids(loader(dm, epoch_fn=lambda: 1))  # seeded, reshuffled per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_inside_an_epoch_continues_with_the_next_batch(log_dir, workers):
    dm = datamodule(log_dir)
    whole = loader(dm, workers=workers)
    order = [b["row_id"] for b in whole]
    partial = loader(dm, workers=workers)
    it = iter(partial)
    for _ in range(5):
        next(it)
    state = partial.state_dict()
    assert state["epoch"] == 0 and state["batch"] == 5
    resumed = loader(dm, workers=workers)
    resumed.load_state_dict(state)
    rest = [b["row_id"] for b in resumed]
    assert len(rest) == len(order) - 5 and all(torch.equal(a, b) for a, b in zip(rest, order[5:], strict=True))
    changed = loader(dm, workers=1 - min(workers, 1))
    with pytest.raises(ConfigError, match="workers was"):
        changed.load_state_dict(state)
    assert interleaved_skip([3, 2], 4) == ([2, 2], 0) and interleaved_skip([1, 3], 3) == ([1, 2], 1)


def test_statistics_are_cached_next_to_the_data_and_follow_the_shards(log_dir, tmp_path):
    copy = tmp_path / "log"
    shutil.copytree(log_dir, copy, ignore=shutil.ignore_patterns("_mtl_stream"))
    dm = datamodule(copy)
    cached = list((copy / "_mtl_stream").glob("stats-*.pt"))
    assert len(cached) == 1
    assert datamodule(copy).feature_spec == dm.feature_spec  # read back, the same
    write_log(copy, rows=900, shards=3, seed=9, row_group=300, **WORLD)  # the same names, other content
    assert datamodule(copy).split_rows != dm.split_rows and len(list((copy / "_mtl_stream").glob("*.pt"))) == 2
    buckets = datamodule(copy, hash_buckets={"user_id": 16})
    assert buckets.feature_spec.categorical["user_id"] == 17


def shards_with(tmp_path: Path, log_dir: Path, change) -> Path:
    """A copy of the log whose second shard is ``change(table)`` (a table, or bytes written as they are)."""
    out = tmp_path / "bad"
    shutil.copytree(log_dir, out, ignore=shutil.ignore_patterns("_mtl_stream"))
    target = out / "part-00001.parquet"
    new = change(pq.read_table(target), target.read_bytes())
    if isinstance(new, bytes):
        target.write_bytes(new)
    else:
        pq.write_table(new, target, row_group_size=300)
    return out


BAD = {
    "no label column": (lambda t, b: t.drop_columns(["like"]), "Shard part-00001.parquet has no column 'like'"),
    "text label": (
        lambda t, b: t.set_column(t.schema.get_field_index("click"), "click", pa.array(["1"] * t.num_rows)),
        "Shard part-00001.parquet: column 'click' must hold numbers",
    ),
    "other schema": (
        lambda t, b: t.set_column(t.schema.get_field_index("region"), "region", t.column("region").cast(pa.string())),
        "Shard part-00001.parquet: column 'region' has type string, but shard part-00000.parquet has int64",
    ),
    "label 2": (
        lambda t, b: t.set_column(
            t.schema.get_field_index("click"), "click", pa.array(np.full(t.num_rows, 2.0, np.float32))
        ),
        r"Shard part-00001.parquet, column 'click': Task 'click' is binary",
    ),
    "missing label": (
        lambda t, b: t.set_column(t.schema.get_field_index("like"), "like", pa.nulls(t.num_rows, pa.float32())),
        "Shard part-00001.parquet: label column 'like' \\(task like\\) is missing in row 0 \\(and 299 more",
    ),
    "truncated": (lambda t, b: b[: len(b) // 2], "Shard part-00001.parquet cannot be read"),
    "corrupt pages": (
        lambda t, b: b[:4] + bytes(len(b) // 2) + b[4 + len(b) // 2 :],
        "Shard part-00001.parquet is corrupt",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_shard_is_one_error_naming_shard_and_column(log_dir, tmp_path, case):
    change, message = BAD[case]
    with pytest.raises(DataError, match=message):
        datamodule(shards_with(tmp_path, log_dir, change))


def test_a_corrupt_shard_can_be_skipped_and_is_counted(log_dir, tmp_path):
    path = shards_with(tmp_path, log_dir, BAD["corrupt pages"][0])
    dm = datamodule(path, on_bad_shard="skip")
    assert dm.rows_skipped == 667 and sum(dm.split_rows.values()) == 2000 - 667
    with pytest.raises(DataError, match=r"data.path=.*empty holds no Parquet shards"):
        datamodule(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.split must be one of"):
        StreamDataModule(path="x", tasks={"click": {"kind": "binary"}}, split="hourly")
    with pytest.raises(ConfigError, match="data.tasks.next must be binary, regression or multiclass"):
        StreamDataModule(path="x", tasks={"next": {"kind": "retrieval"}})
    with pytest.raises(ConfigError, match="data.path must name"):
        StreamDataModule(path=None, tasks={"click": {"kind": "binary"}})
    # one bin would put every score in it (as the schema and BinnedAUROC refuse it): refused at construction too
    with pytest.raises(ConfigError, match="data.auroc_bins must be an integer >= 2, got 1"):
        StreamDataModule(path="x", tasks={"click": {"kind": "binary"}}, auroc_bins=1)
