"""conf/experiment/*.yaml: each named setting composes, applies its settings over the defaults and trains
end to end (on the small Census fixture files for the census_* settings); a new file is enrolled automatically."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, RECSYS_TINY, options


@pytest.mark.parametrize("name", options("experiment"))
def test_experiment_trains_and_selects_on_validation(name, census_root, make_cfg, mlflow_runs, tmp_path):
    from mtl_experiments.pipeline import train

    raw = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
    overrides = [f"experiment={name}", "trainer.max_epochs=1", "trainer.enable_model_summary=false"]
    if name.startswith("census_"):
        overrides += [f"data.root={census_root}", f"data.cache_dir={tmp_path / 'cache'}", "data.batch_size=16"]
    if name.startswith("recsys_"):
        overrides += [*RECSYS_TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = make_cfg(*overrides, "~callbacks.progress_bar", tiny=False)
    # the experiment's own values win over the defaults (it is applied after train.yaml)
    assert cfg.optimized_metric == raw.optimized_metric and cfg.optimized_metric.startswith("val/")
    assert cfg.features.embedding_dim == raw.features.embedding_dim
    assert OmegaConf.to_container(cfg.backbone)["_target_"].split(".")[-2] == raw.defaults[1]["override /backbone"]
    train(cfg)
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags["experiment"] == name  # the choice is a tag: runs group by experiment in the UI
    assert {k for k in run.data.metrics if k.startswith("test/") and k.endswith("/auroc")}


@pytest.mark.parametrize("group, tasks", [(1, ["income", "marital"]), (2, ["education", "marital"])])
def test_census_task_group_alone_picks_its_tasks(group, tasks, census_root, tmp_path):
    from mtl_experiments.data.census_income import CensusIncomeDataModule

    dm = CensusIncomeDataModule(root=str(census_root), task_group=group, cache=False)
    assert list(dm.tasks) == tasks and all(t.kind == "binary" for t in dm.tasks.values())
