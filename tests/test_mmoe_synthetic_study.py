"""conf/experiment/mmoe_synthetic/*.yaml (the §5 synthetic setting of Ma et al., KDD 2018) and
scripts/study_mmoe.py: every option composes to the paper's setting, the backbones have the paper's weight
counts, and one run trains end to end and lands in the study's table. A new file in the folder is enrolled."""

from __future__ import annotations

import importlib.util
import math

import pytest
from hydra.utils import instantiate
from torch import nn

from tests.conftest import CONF, compose_cfg

SETTINGS = sorted(p.stem for p in (CONF / "experiment" / "mmoe_synthetic").glob("*.yaml"))
# §5: "100·16·8 + 16·8·2 = 13056" weights in the experts and towers; Shared-Bottom "100·113 + 113·8·2 = 13108"
PAPER_WEIGHTS = {"mmoe": 100 * 16 * 8 + 16 * 8 * 2, "omoe": 100 * 16 * 8 + 16 * 8 * 2, "shared_bottom": 13108}


def study_script():
    spec = importlib.util.spec_from_file_location("study_mmoe", CONF.parent / "scripts" / "study_mmoe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def linear_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("name", SETTINGS)
def test_setting_is_the_papers(name, tmp_path):
    """Two regression tasks, data regenerated per seed, selection on validation MSE, 100 inputs; the backbone's
    experts + towers (MoE) or bottom + towers (Shared-Bottom) hold the weight counts §5 gives (weights only)."""
    extra = ["backbone=mmoe"] if name == "setting" else []
    cfg = compose_cfg([f"experiment=mmoe_synthetic/{name}", "seed=3", *extra], tmp_path)
    assert {t.kind for t in cfg.data.tasks.values()} == {"regression"} and list(cfg.data.tasks) == ["y1", "y2"]
    assert cfg.data.seed == 3 and cfg.data.input_dim == 100
    assert cfg.optimized_metric == "val/mean_mse" and cfg.optimizer.lr == 0.001
    if name == "setting":  # the backbone's own defaults (the ablation), not the paper's sizes
        return
    backbone = instantiate(cfg.backbone, input_dim=100, task_names=["y1", "y2"])
    shared = backbone.experts if hasattr(backbone, "experts") else backbone.bottom
    assert linear_weights(shared) + linear_weights(backbone.towers) == PAPER_WEIGHTS[name]


def test_a_study_run_trains_and_enters_the_table(train_run, tracking_uri):
    train_run(
        "experiment=mmoe_synthetic/mmoe",
        "data.num_samples=600",
        "trainer.max_epochs=1",
        "data.correlation=0.9",
        metrics=("test/mean_mse", "train/mean_mse"),
    )
    study = study_script()
    from mlflow.tracking import MlflowClient

    rows = study.collect(MlflowClient(tracking_uri), "mmoe-synthetic")
    assert [(r["backbone"], r["correlation"], r["kind"], r["seed"]) for r in rows] == [("mmoe", 0.9, "regression", 0)]
    table = study.main_table(rows, "test/mean_mse").splitlines()
    assert len(table) == 3 and table[2].startswith("| 0.9 | mmoe | 1 | ")
    assert math.isclose(float(table[2].split("|")[4].split("±")[0]), rows[0]["metrics"]["test/mean_mse"], abs_tol=1e-4)


def test_paired_difference_is_per_seed():
    """Δ pairs each backbone's run with Shared-Bottom's on the same seed (= the same data), hand-computed."""
    study = study_script()
    rows = [
        {"correlation": 0.5, "backbone": b, "seed": s, "metrics": {"m": v}}
        for b, s, v in [("shared_bottom", 0, 1.0), ("shared_bottom", 1, 3.0), ("mmoe", 0, 0.5), ("mmoe", 1, 3.5)]
    ] + [{"correlation": 0.5, "backbone": "mmoe", "seed": 2, "metrics": {"m": 9.0}}]  # no partner: left out
    assert dict(study.paired(rows, "m")) == {(0.5, "mmoe"): [-0.5, 0.5]}


def test_ablation_pairs_within_task_kind_and_sizes():
    """Binary runs pair with binary Shared-Bottom, paper sizes with paper sizes; AUROC for binary, MSE else."""
    study = study_script()

    def row(kind, experiment, backbone, seed, value):
        metric = "test/mean_mse" if kind == "regression" else "test/mean_auroc"
        return {
            "kind": kind,
            "experiment": experiment,
            "backbone": backbone,
            "seed": seed,
            "correlation": 0.5,
            "sizes": "s",
            "metrics": {metric: value},
        }

    rows = [
        row("binary", "mmoe_synthetic/mmoe", "mmoe", 0, 0.90),
        row("binary", "mmoe_synthetic/shared_bottom", "shared_bottom", 0, 0.95),
        row("regression", "mmoe_synthetic/setting", "mmoe", 0, 0.2),
        row("regression", "mmoe_synthetic/setting", "shared_bottom", 0, 0.5),
        row("regression", "mmoe_synthetic/mmoe", "mmoe", 0, 7.0),  # paper sizes: no Shared-Bottom partner
    ]
    table = study.ablation_table(rows).splitlines()[2:]
    cells = {tuple(c.strip() for c in line.split("|")[1:4]): line.split("|")[5:7] for line in table}
    assert cells[("binary", "paper (§5): s", "mmoe")] == [" test/mean_auroc 0.9000 ± nan ", " -0.0500 ± nan "]
    assert cells[("regression", "backbone defaults: s", "mmoe")][1].strip() == "-0.3000 ± nan"
    assert cells[("regression", "paper (§5): s", "mmoe")][1].strip() == "—"
