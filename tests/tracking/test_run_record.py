"""What a run records for the MLflow UI: readable names, choices as params and paths as tags, the experiment's kind,
the dataset as an MLflow dataset input, the console log."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from mtl_experiments import tracking
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.sweep import sweep_name
from mtl_experiments.tracking.dataset import digest, schema_json, source

CHOICES = {"data": "synthetic", "backbone": "mmoe", "loss": "pcgrad", "hydra/launcher": "basic", "debug": None}


@pytest.mark.parametrize(
    ("overrides", "swept", "name"),
    [
        ([], [], "synthetic-mmoe-pcgrad-seed3"),
        (["loss=pcgrad", "seed=3", "trainer.max_epochs=2"], ["loss", "seed"], "s3 pcgrad | synthetic-mmoe"),
        (["loss=pcgrad", "+optimizer.lr=0.01"], ["loss", "optimizer.lr"], "lr=0.01 pcgrad | synthetic-mmoe-seed3"),
        (["+optimizer.lr=0.01", "loss=pcgrad"], ["optimizer.lr"], "lr=0.01 | synthetic-mmoe-pcgrad-seed3"),
        (["data=synthetic", "backbone=mmoe"], ["backbone", "data"], "mmoe synthetic | pcgrad-seed3"),
    ],
)
def test_run_name_leads_with_the_swept_values(overrides, swept, name):
    assert tracking.default_run_name(CHOICES, overrides, 3, swept) == name


def test_sweep_is_named_after_its_data_and_swept_keys():
    assert sweep_name("synthetic", ["loss", "seed"], "12-00-00-ab") == "synthetic: loss x seed (12-00-00-ab)"
    assert sweep_name("tabular", ["optimizer.lr"], "x") == "tabular: lr (x)"
    assert sweep_name("synthetic", ["data", "seed"], "x") == "sweep: data x seed (x)"  # the data varies: not named
    assert sweep_name("synthetic", [], "x") == "synthetic sweep (x)"


def test_choices_are_params_and_per_run_paths_are_tags():
    params = {
        "loss._target_": "mtl_experiments.loss.pcgrad.PCGrad",
        "optimizer.lr": 0.01,
        "paths.output_dir": "/o/1",
        "callbacks.model_checkpoint.dirpath": "/o/1/checkpoints",
        "trainer.default_root_dir": "/o/1",
        "trainer.max_epochs": 3,
        "data.path": "x.csv",
    }
    logged = tracking.run_params(params, CHOICES)
    assert logged == {
        "loss._target_": "mtl_experiments.loss.pcgrad.PCGrad",
        "optimizer.lr": 0.01,
        "trainer.max_epochs": 3,
        "data.path": "x.csv",
        "data": "synthetic",
        "backbone": "mmoe",
        "loss": "pcgrad",
    }
    assert tracking.path_tags(params) == {
        "paths.output_dir": "/o/1",
        "callbacks.model_checkpoint.dirpath": "/o/1/checkpoints",
        "trainer.default_root_dir": "/o/1",
    }


def test_resumed_run_sees_no_change_in_its_choices_or_paths():
    """The stored params hold choices but no paths: a resumed attempt elsewhere (new folders) changed nothing,
    a changed setting is still found."""
    from mlflow.entities import Param, Run, RunData, RunInfo, RunTag

    params = {"optimizer.lr": 0.01, "loss._target_": "PCGrad", "paths.output_dir": "/o/1", "seed": 0}
    logged = tracking.run_params(params, CHOICES)
    data = RunData(
        params=[Param(k, str(v)) for k, v in logged.items()],
        tags=[RunTag(k, v) for k, v in tracking.run_tags(CHOICES, []).items()],
    )
    run = Run(RunInfo("r", "0", "u", "FINISHED", 0, 1, "active", run_name="r"), data)
    assert tracking.changed_params(run, {**params, "paths.output_dir": "/elsewhere/2"}) == {}
    assert tracking.changed_params(run, {**params, "optimizer.lr": 0.1}) == {"optimizer.lr": ("0.01", "0.1")}


def random_splits(gen: torch.Generator, rows: int = 7):
    split = lambda n: {  # noqa: E731
        "features": {"numeric": torch.randn(n, 2, generator=gen), "categorical": torch.randint(0, 5, (n, 1))},
        "labels": {"click": torch.randint(0, 2, (n,), generator=gen).float()},
        "user_id": torch.randint(1, 9, (n,), generator=gen),
    }
    return {"train": split(rows), "val": split(3), "test": split(2)}


SPEC = FeatureSpec(numeric=("age", "price"), categorical={"city": 5})


def test_dataset_digest_changes_with_any_value_and_only_then():
    """On many random splits: a copy has the same digest; one changed element (float32 or id), or one row moved to
    another split, gives another."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        splits = random_splits(gen)
        same = {k: {**v, "features": dict(v["features"])} for k, v in splits.items()}
        assert digest(same, SPEC) == digest(splits, SPEC)
        i = int(torch.randint(0, 7, (1,), generator=gen))
        bumped = splits["train"]["features"]["numeric"].clone()
        bumped[i, 1] = torch.nextafter(bumped[i, 1], torch.tensor(float("inf")))  # the smallest float32 change
        changed = {**splits, "train": {**splits["train"], "features": {**splits["train"]["features"]}}}
        changed["train"]["features"]["numeric"] = bumped
        assert digest(changed, SPEC) != digest(splits, SPEC)
        ids = splits["train"]["user_id"].clone()
        ids[i] += 1
        assert digest({**splits, "train": {**splits["train"], "user_id": ids}}, SPEC) != digest(splits, SPEC)
        swapped = {**splits, "val": splits["test"], "test": splits["val"]}
        assert digest(swapped, SPEC) != digest(splits, SPEC)


def test_dataset_schema_names_every_column_with_its_type():
    schema = json.loads(schema_json(random_splits(torch.Generator().manual_seed(1))["train"], SPEC))
    assert [(c["name"], c["type"]) for c in schema["mlflow_colspec"]] == [
        ("age", "float"),
        ("price", "float"),
        ("city", "long"),
        ("user_id", "long"),
        ("label.click", "float"),
    ]


def test_ui_links_open_the_runs_view():
    base = tracking.ui_base("http://ana:secret@mlflow.example.org:5000/")
    assert base == "http://mlflow.example.org:5000"
    assert tracking.ui_base("sqlite:////x/mlflow.db") == "http://127.0.0.1:5000"
    assert tracking.experiment_url(base, "3") == f"{base}/#/experiments/3/runs?workflowType=machine_learning"
    assert tracking.run_url(base, "3", "ab") == f"{base}/#/experiments/3/runs/ab?workflowType=machine_learning"
    assert tracking.open_command("sqlite:////x/mlflow.db") == "mlflow ui --backend-store-uri sqlite:////x/mlflow.db"


def test_dataset_source_is_the_absolute_file_or_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # outside a Hydra run: the process's cwd
    monkeypatch.chdir(tmp_path)
    name, kind, where = source({"path": "data/x.csv", "_target_": "T"}, "tabular")
    assert (name, kind, json.loads(where)) == ("tabular:x.csv", "local", {"uri": str(tmp_path / "data" / "x.csv")})
    name, kind, where = source({"root": "../ml-1m"}, "movielens")
    assert (name, kind, json.loads(where)) == ("movielens", "local", {"uri": str(tmp_path.parent / "ml-1m")})
