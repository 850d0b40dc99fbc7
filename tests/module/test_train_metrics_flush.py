"""The train metrics updated in chunks of kept_outputs.FLUSH_ROWS rows: the same values as one update with the
epoch's rows, the kept rows bounded, and a mid-epoch checkpoint (metric states + the rows kept since) resumed
exactly, also from a checkpoint of the older format (all the epoch's rows in ``train_outputs``)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from mtl_experiments import checkpoints, kept_outputs
from mtl_experiments.checkpoints import LastCheckpoint, load
from mtl_experiments.data.synthetic import SyntheticDataModule
from mtl_experiments.kept_outputs import KeptOutputs
from mtl_experiments.tasks.binary import BinaryTask
from mtl_experiments.tasks.regression import RegressionTask
from tests.conftest import bare_trainer
from tests.module.test_module import TASKS, setup_module_and_batch
from tests.test_resume import CrashAt

EXACT = ("auroc", "gauc", "accuracy")  # concatenated rows / integer counts: bit for bit


def metric_sets():
    binary, regression = BinaryTask("a"), RegressionTask("b")
    binary.group_by = "user_id"
    tasks = {"a": binary, "b": regression}
    return tasks, {name: task.metrics() for name, task in tasks.items()}


def update(tasks, metrics):
    def apply(outputs, batch):
        for name, task in tasks.items():
            task.update_metrics(metrics[name], outputs[name], batch["labels"][name], {"user_id": batch["user_id"]})

    return apply


def update_plain(tasks, metrics):
    def apply(outputs, batch):
        for name, task in tasks.items():
            task.update_metrics(metrics[name], outputs[name], batch["labels"][name])

    return apply


def concatenated(batches):
    outputs = {n: torch.cat([o[n] for o, _ in batches]) for n in ("a", "b")}
    labels = {n: torch.cat([b["labels"][n] for _, b in batches]) for n in ("a", "b")}
    return outputs, {"labels": labels, "user_id": torch.cat([b["user_id"] for _, b in batches])}


def computed(metrics) -> dict[str, float]:
    return {f"{t}/{k}": float(v) for t, m in metrics.items() for k, v in m.compute().items()}


def random_batches(g: torch.Generator, dtype: torch.dtype, steps: int):
    for _ in range(steps):
        n = int(torch.randint(1, 40, (), generator=g))
        # coarse logits: ties within and across chunks, which AUROC and GAUC count one half
        outputs = {"a": (torch.randint(-3, 4, (n, 1), generator=g) / 2).to(dtype), "b": torch.randn(n, 1, dtype=dtype)}
        labels = {"a": torch.randint(0, 2, (n,), generator=g).float(), "b": torch.randn(n, generator=g)}
        yield outputs, {"labels": labels, "user_id": torch.randint(1, 6, (n,), generator=g), "features": {}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_updates_equal_one_update_of_all_rows(dtype, monkeypatch):
    """Defining property, on many random epochs: updating every >= 50 rows in step order gives one update's values."""
    monkeypatch.setattr(kept_outputs, "FLUSH_ROWS", 50)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        batches = list(random_batches(g, dtype, steps=int(torch.randint(1, 30, (), generator=g))))
        tasks, chunked = metric_sets()
        calls, apply = [], update(tasks, chunked)

        def counted(outputs, batch, calls=calls, apply=apply):
            calls.append(len(batch["user_id"]))
            apply(outputs, batch)

        kept = KeptOutputs(list(tasks), counted)
        for outputs, batch in batches:
            kept.append(outputs, batch)
            assert kept.rows < 50  # never more than FLUSH_ROWS kept after a step
        kept.flush()
        tasks, whole = metric_sets()
        update(tasks, whole)(*concatenated(batches))
        assert sum(calls) == sum(len(b["user_id"]) for _, b in batches)
        got, want = computed(chunked), computed(whole)
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key.split("/")[1] in EXACT:
                assert got[key] == value or (value != value and got[key] != got[key]), key  # NaN gauc: both NaN
            else:  # summed in another order: log loss in float64, torchmetrics' MSE / MAE states in float32
                assert got[key] == pytest.approx(value, rel=1e-12 if key.endswith("logloss") else 1e-5), key


def test_two_chunks_give_the_hand_computed_values(monkeypatch):
    """Scores (0.1, 0.4 | 0.35, 0.8), labels (0, 0 | 1, 1), flushed after each pair: of the 4 positive-negative pairs
    only (0.35 vs 0.4) is misordered, AUROC = 3/4; log loss = -(ln 0.9 + ln 0.6 + ln 0.35 + ln 0.8) / 4."""
    monkeypatch.setattr(kept_outputs, "FLUSH_ROWS", 2)
    tasks = {"a": BinaryTask("a")}
    metrics = {"a": tasks["a"].metrics()}
    kept = KeptOutputs(["a"], update_plain(tasks, metrics))

    def logit(p):
        return torch.log(torch.tensor(p, dtype=torch.float64) / (1 - torch.tensor(p, dtype=torch.float64)))

    kept.append({"a": logit([0.1, 0.4])[:, None]}, {"labels": {"a": torch.tensor([0.0, 0.0])}})
    assert kept.rows == 0  # handed over
    kept.append({"a": logit([0.35, 0.8])[:, None]}, {"labels": {"a": torch.tensor([1.0, 1.0])}})
    values = computed(metrics)
    assert values["a/auroc"] == 0.75
    expected = -(torch.tensor([0.9, 0.6, 0.35, 0.8], dtype=torch.float64).log().sum() / 4)
    assert values["a/logloss"] == pytest.approx(float(expected), rel=1e-12)
    assert values["a/accuracy"] == 0.75  # 0.35 < 0.5 is the one wrong call


def epoch_values(logger: CSVLogger) -> dict[str, str]:
    """The train metrics' row of a one-epoch run's metrics.csv."""
    logger.save()
    with open(logger.experiment.metrics_file_path) as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("train/a/auroc")]
    return {k: v for k, v in row.items() if k.startswith("train/") and "/loss" not in k and "weight" not in k}


def fit(tmp_path, name: str, *callbacks: pl.Callback, ckpt_path=None) -> dict[str, str]:
    module, _ = setup_module_and_batch()
    dm = SyntheticDataModule(tasks=TASKS, num_samples=400, input_dim=10, batch_size=32)
    logger = CSVLogger(tmp_path / name)
    trainer = bare_trainer(max_epochs=1, logger=logger, enable_checkpointing=bool(callbacks), callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return epoch_values(logger)


@pytest.mark.parametrize("layout", ["states", "older"])
def test_mid_epoch_resume_gives_the_uninterrupted_train_metrics(layout, tmp_path, monkeypatch):
    """Killed after step 9 of 10, resumed from step 8's checkpoint: the epoch's train metrics are the uninterrupted
    run's. ``states``: updated every 96 rows (3 steps of 32), the checkpoint holds the states of steps 1-6 and the
    rows of steps 7-8; ``older``: a checkpoint of the older format (no states, ``train_outputs``: steps 1-8's rows)."""
    if layout == "states":
        monkeypatch.setattr(kept_outputs, "FLUSH_ROWS", 96)
    reference = fit(tmp_path, "reference")  # no checkpoints: the chunks do not depend on them
    assert {"train/a/auroc", "train/a/logloss", "train/b/mse"} <= reference.keys()
    folder = tmp_path / "checkpoints"
    last = LastCheckpoint(dirpath=str(folder), every_n_train_steps=4, every_n_minutes=None)
    with pytest.raises(RuntimeError, match="injected crash"):
        fit(tmp_path, "run", last, CrashAt(step=9))
    checkpoint = load(folder / "last.ckpt")
    state = checkpoint["mtl"]
    kept_rows = len(state["train_outputs"]["batch"]["labels"]["a"])
    assert checkpoint["global_step"] == 8 and kept_rows == 32 * (2 if layout == "states" else 8)
    assert state["train_metrics"]["a"]["updated"] == (layout == "states")
    path = folder / "last.ckpt"
    if layout == "older":
        del state["train_metrics"]
        path = folder / "older.ckpt"  # not over last.ckpt: load() memory-maps it
        torch.save(checkpoint, path)
    resumed = fit(tmp_path, "resumed", ckpt_path=path)
    assert resumed == reference


def test_metric_states_round_trip_without_a_later_update(recwarn):
    """States saved and set on fresh metrics compute the same values, also when no update() follows (a task with no
    labelled row after the resume), without torchmetrics' warning; a never-updated set is reported as such."""
    g = torch.Generator().manual_seed(1)
    tasks, metrics = metric_sets()
    update(tasks, metrics)(*concatenated(list(random_batches(g, torch.float32, steps=5))))
    saved = checkpoints.metric_states(metrics)
    expected = computed(metrics)
    _, fresh = metric_sets()
    assert checkpoints.load_metric_states(fresh, saved, torch.device("cpu")) == {"a", "b"}
    got = {f"{t}/{k}": float(v) for t, m in fresh.items() for k, v in checkpoints.compute(m).items()}
    assert got == expected
    assert not [w for w in recwarn if "compute" in str(w.message)]
    _, untouched = metric_sets()
    assert checkpoints.load_metric_states(fresh, checkpoints.metric_states(untouched), torch.device("cpu")) == set()
