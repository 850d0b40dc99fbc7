"""Label masks (observed_if, rows without a label) and warm / cold evaluation segments."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.data.base import TabularDataModule, segment_masks
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.loss.equal import Equal
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule
from tests.conftest import RECSYS_TINY


def test_segment_masks_by_hand():
    split = {"user_id": torch.tensor([1, 2, 3, 3]), "item_id": torch.tensor([5, 6, 5, 7])}
    seen = {"user_id": torch.tensor([1, 3]), "item_id": torch.tensor([5, 6])}
    masks = segment_masks(split, seen)
    assert masks["cold_user"].tolist() == [False, True, False, False]
    assert masks["cold_item"].tolist() == [False, False, False, True]
    assert masks["warm"].tolist() == [True, False, True, False]
    assert segment_masks({"labels": {}}, seen) == {}  # a split without ids has no segments


class _Rows(TabularDataModule):
    """Rows with given labels and ids, every split the same (enough for the module-level checks)."""

    def __init__(self, labels, tasks, **kw):
        super().__init__(tasks=tasks, **kw)
        self.rows = labels

    def load(self):
        n = len(next(iter(self.rows.values())))
        split = {"features": {"numeric": torch.randn(n, 3, generator=torch.Generator().manual_seed(0))},
                 "labels": {k: v.clone() for k, v in self.rows.items()}}  # fmt: skip
        return split, split, split, FeatureSpec(numeric=("a", "b", "c"))


TASKS = {"click": {"kind": "binary"}, "like": {"kind": "binary", "observed_if": "click"}}


def _module(dm):
    dm.setup()
    torch.manual_seed(0)
    encoder = FeatureEncoder(dm.feature_spec)
    model = MultiTaskModel(encoder, SharedBottom(encoder.output_dim, list(dm.tasks), (8,), ()), dm.tasks)
    return MTLModule(model, dm.tasks, Equal(), functools.partial(torch.optim.SGD, lr=0.1))


def test_observed_if_masks_the_loss_to_observed_rows():
    click = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    like = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    dm = _Rows({"click": click, "like": like}, TASKS)
    module = _module(dm)
    batch = dm.splits["train"]
    outputs = module.model(batch["features"])
    losses = module._losses(outputs, batch["labels"])
    clicked = click > 0
    expected = F.binary_cross_entropy_with_logits(outputs["like"].squeeze(-1)[clicked], like[clicked])
    assert losses[1].item() == pytest.approx(expected.item(), rel=1e-6)
    assert losses[0].item() == pytest.approx(
        F.binary_cross_entropy_with_logits(outputs["click"].squeeze(-1), click).item(), rel=1e-6
    )
    # metrics see only the observed rows: like's AUROC over rows 0, 2, 4 (labels 1, 0, 1)
    metrics = module.task_metrics["on_val"]
    module._update_metrics(metrics, outputs, batch)
    p = torch.sigmoid(outputs["like"].squeeze(-1)).detach()[clicked]
    auc = ((p[0] > p[1]).float() + (p[2] > p[1]).float()) / 2
    assert metrics["like"]["auroc"].compute().item() == pytest.approx(auc.item())


def test_a_batch_without_observed_rows_gives_a_zero_loss_with_a_graph():
    dm = _Rows({"click": torch.zeros(4), "like": torch.zeros(4)}, TASKS)
    module = _module(dm)
    batch = dm.splits["train"]
    losses = module._losses(module.model(batch["features"]), batch["labels"])
    assert losses[1].item() == 0.0 and losses.requires_grad
    losses.sum().backward()  # no error: every task's loss is connected to the graph


@pytest.mark.parametrize(
    "tasks",
    [
        {"like": {"kind": "binary", "observed_if": "click"}},  # no such task
        {"click": {"kind": "regression"}, "like": {"kind": "binary", "observed_if": "click"}},  # not binary
    ],
)
def test_observed_if_must_name_a_binary_task(tasks):
    with pytest.raises(ConfigError, match="observed_if"):
        _Rows({"click": torch.zeros(4), "like": torch.zeros(4)}, tasks)


@pytest.mark.parametrize("split", ["cold_user", "cold_item"])
def test_cold_split_logs_warm_and_cold_metrics(split, train_run, tmp_path):
    train_run(
        "data=recsys_synthetic",
        *RECSYS_TINY,
        f"data.cache_dir={tmp_path / 'cache'}",
        f"data.split={split}",
        "data.cold_fraction=0.3",
        "~data.tasks.watch_time",
        "~data.tasks.interest",
        "+data.tasks.like.observed_if=click",
        "trainer.max_epochs=1",
        metrics=[
            *(f"{stage}/{segment}/{task}/auroc" for segment in ("warm", split) for task in ("click", "like")
              for stage in ("val", "test")),
            "test/click/gauc",  # batches carry user ids: grouped AUC
        ],
    )  # fmt: skip
