"""torch-rechub's MMOE and MTLTrainer as a throughput contender (``--rechub``, implied by ``--census``).

torch-rechub's own ``MMOE`` trained by its own ``MTLTrainer.train_one_epoch`` on the same train tensors
(converted to the numpy columns its ``DataGenerator`` takes, as its ``examples/ranking/run_census.py`` does),
sized from the config: the same categorical columns and cardinalities, the same embedding dimension per
column, the same numeric columns (one ``DenseFeature`` each), experts, towers, optimizer and batch size. Its MLP
layers add a BatchNorm after every Linear (its design; the parameter counts of both are printed), its
DataLoader builds each batch from per-row ``__getitem__`` + collate, and its tqdm bar and per-epoch print go
to /dev/null. It needs the optional package, installed in the benchmark's environment only (never a project
dependency)::

    pip install torch-rechub        # 0.9.0 measured; it needs nothing the project does not already have

Without it the contender is skipped and the output says why.
"""

from __future__ import annotations

import contextlib
import os

import lightning.pytorch as pl
import numpy as np
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from mtl_experiments import pipeline
from mtl_experiments.bench.timing import Seconds, Stopwatch
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError

RECHUB = "rechub"
RECHUB_INSTALL = "pip install torch-rechub"
MMOE_TARGET = "mtl_experiments.backbone.mmoe.MMoE"


def rechub_missing() -> str | None:
    """Why the rechub contender cannot run here, or None when it can."""
    try:
        import torch_rechub.trainers  # noqa: F401
    except Exception as e:  # not installed, or installed against versions it cannot import with
        return f"torch_rechub cannot be imported ({type(e).__name__}: {e})"
    return None


def rechub_columns(split: dict, spec: FeatureSpec) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A split as the ``{column: numpy array}`` + ``labels[N, T]`` that torch-rechub's ``DataGenerator`` takes."""
    features = split["features"]
    x = {name: features["categorical"][:, i].numpy() for i, name in enumerate(spec.categorical)}
    x.update({name: features["numeric"][:, j].numpy() for j, name in enumerate(spec.numeric)})
    y = np.stack([label.numpy() for label in split["labels"].values()], axis=1)
    return x, y


def rechub_task_types(cfg: DictConfig, datamodule: TabularDataModule) -> list[str]:
    """torch-rechub's task type of each task; ConfigError where its MMOE cannot stand in for our model."""
    backbone = cfg.backbone
    if backbone._target_ != MMOE_TARGET:
        raise ConfigError(
            f"The rechub contender trains torch-rechub's MMOE, so it needs backbone=mmoe; this config has "
            f"{backbone._target_}. Use --census, or add backbone=mmoe."
        )
    if str(backbone.get("activation", "ReLU")) != "ReLU":
        raise ConfigError("The rechub contender uses ReLU (torch-rechub's default); set backbone.activation=ReLU.")
    kinds = {"binary": "classification", "regression": "regression"}
    task_types = []
    for name, task in datamodule.tasks.items():
        if task.kind not in kinds:
            raise ConfigError(
                f"torch-rechub's MTLTrainer has binary and regression tasks only; '{name}' is {task.kind}."
            )
        task_types.append(kinds[task.kind])
    return task_types


def build_rechub(cfg: DictConfig, datamodule: TabularDataModule):
    """torch-rechub's MMOE, MTLTrainer and train DataLoader sized from ``cfg`` (as its run_census.py builds them)."""
    from torch_rechub.basic.features import DenseFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE
    from torch_rechub.trainers import MTLTrainer
    from torch_rechub.utils.data import DataGenerator

    task_types = rechub_task_types(cfg, datamodule)
    backbone, spec = cfg.backbone, datamodule.feature_spec
    encoder = pipeline.build(cfg, "features", spec=spec)  # the embedding dimension of each column, as ours
    features = [SparseFeature(c, card, embed_dim=encoder.embedding_dims[c]) for c, card in spec.categorical.items()]
    features += [DenseFeature(c) for c in spec.numeric]
    dropout = float(backbone.get("dropout", 0.0))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    model = MMOE(
        features,
        task_types,
        int(backbone.num_experts),
        expert_params={"dims": list(backbone.expert_dims), "dropout": dropout},
        tower_params_list=[{"dims": list(backbone.tower_dims), "dropout": dropout}] * len(task_types),
    )
    optimizer = OmegaConf.to_container(cfg.optimizer, resolve=True)
    optimizer_fn = get_class(optimizer.pop("_target_"))
    optimizer.pop("_partial_", None)
    trainer = MTLTrainer(model, task_types, optimizer_fn=optimizer_fn, optimizer_params=optimizer, device="cpu")
    x, y = rechub_columns(datamodule.splits["train"], spec)
    x_val, y_val = rechub_columns(datamodule.splits["val"], spec)
    loaders = DataGenerator(x, y).generate_dataloader(
        x_val=x_val, y_val=y_val, x_test=x_val, y_test=y_val, batch_size=datamodule.batch_size
    )
    return trainer, loaders[0]


def rechub_fit(cfg: DictConfig, datamodule: TabularDataModule, epochs: int) -> Seconds:
    trainer, loader = build_rechub(cfg, datamodule)
    # its trainer has no switch for its tqdm bar and per-epoch print: they still run, into /dev/null
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        clock = Stopwatch()
        for _ in range(epochs):
            trainer.train_one_epoch(loader)
        return clock.elapsed()
