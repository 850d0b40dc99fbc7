"""One process of a multi-node ``data=stream`` job, started by ``torchrun`` (one per "node"); each rank saves the
row ids it trained on per epoch and its final parameters. Used by tests/test_ddp_stream.py (a helper, not a test
module)::

    torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT \
        tests/ddp_stream_worker.py OUT_DIR LOG_DIR

The job is what ``python train.py data=stream data.path=LOG_DIR trainer=ddp trainer.num_nodes=2`` builds (the
real config, datamodule, model and module), without tracking or checkpoints. It runs twice in the same process
group: as is (``rank<r>.pt``), then with ``data.on_bad_shard=skip`` where rank 1's copy of the last shard it reads
in epoch 0 is truncated after the statistics pass, as a node whose disk copy went bad (``skip-rank<r>.pt``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf

from mtl_experiments.data.stream.loader import StreamLoader
from mtl_experiments.pipeline import build, build_model, build_module

CONF = Path(__file__).resolve().parents[1] / "conf"
EPOCHS = 2


class RowIds(pl.Callback):
    """The ``row_id`` of every training row this rank trains on, and the logged row counts, per epoch."""

    def __init__(self):
        self.rows: dict[int, list[int]] = defaultdict(list)
        self.counts: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows[trainer.current_epoch] += batch["row_id"].tolist()

    def on_train_epoch_end(self, trainer, pl_module):
        self.counts[trainer.current_epoch] = dict(trainer.datamodule.last_epoch_counts)


def build_job(log_dir: str, *overrides: str):
    """The config, datamodule and module of the job, seeded as train.py seeds them (the test builds its 1-process
    reference here too)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        data = [f"data.path={log_dir}", "data.row_id_column=row_id", "data.batch_size=32", "data.shuffle_buffer=100"]
        cfg = compose(config_name="train", overrides=["data=stream", *data, *overrides])
    pl.seed_everything(cfg.seed)
    datamodule = build(cfg, "data")
    datamodule.setup()
    return cfg, datamodule, build_module(cfg, datamodule, build_model(cfg, datamodule))


def corrupt_rank1_shard(datamodule, out: Path) -> str:
    """Rank 1's last shard of epoch 0 replaced by a truncated copy (rank 0 keeps the good file); its name."""
    source = datamodule.source
    plan = StreamLoader(source, "train", datamodule.batch_size, datamodule.shuffle_seed, True, 1, 2).plan(0)
    shard = plan.groups(plan.per_rank, 2 * plan.per_rank)[-1][0]
    copy = out / f"truncated-{shard.name}"
    data = Path(shard.path).read_bytes()
    copy.write_bytes(data[: len(data) // 2])
    source.shards[source.shards.index(shard)] = dataclasses.replace(shard, path=str(copy))
    return shard.name


def fit(out: Path, log_dir: str, name: str, *overrides: str) -> None:
    cfg, datamodule, module = build_job(log_dir, *overrides)
    rank = int(os.environ["RANK"])
    bad = corrupt_rank1_shard(datamodule, out) if name == "skip" and rank == 1 else None
    rows = RowIds()
    nodes = int(os.environ["WORLD_SIZE"])
    strategy = DDPStrategy(timeout=timedelta(seconds=120))  # a rank left waiting fails in 2 minutes, not 30
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=nodes, strategy=strategy, max_epochs=EPOCHS,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rows])  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    config = OmegaConf.to_container(cfg.data, resolve=True)
    result = {"rows": dict(rows.rows), "counts": rows.counts, "state": state, "world": trainer.world_size,
              "data": config, "steps": trainer.global_step, "bad_shard": bad}  # fmt: skip
    torch.save(result, out / f"{name}rank{trainer.global_rank}.pt")


def main(out: Path, log_dir: str) -> None:
    fit(out, log_dir, "")
    fit(out, log_dir, "skip", "data.on_bad_shard=skip")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
