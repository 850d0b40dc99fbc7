"""One process of a multi-node ``data=stream`` job, started by ``torchrun`` (one per "node"); each rank saves the
row ids it trained on per epoch and its final parameters. Used by tests/test_ddp_stream.py (a helper, not a test
module)::

    torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=127.0.0.1:PORT \
        tests/ddp_stream_worker.py OUT_DIR LOG_DIR

The job is what ``python train.py data=stream data.path=LOG_DIR trainer=ddp trainer.num_nodes=2`` builds (the
real config, datamodule, model and module), without tracking or checkpoints.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtl_experiments.pipeline import build, build_model, build_module

CONF = Path(__file__).resolve().parents[1] / "conf"


class RowIds(pl.Callback):
    """The ``row_id`` of every training row this rank trains on, per epoch."""

    def __init__(self):
        self.rows: dict[int, list[int]] = defaultdict(list)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows[trainer.current_epoch] += batch["row_id"].tolist()


def main(out: Path, log_dir: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["data=stream", f"data.path={log_dir}",
                      "data.row_id_column=row_id", "data.batch_size=32", "data.shuffle_buffer=100"])  # fmt: skip
    pl.seed_everything(cfg.seed)
    datamodule = build(cfg, "data")
    datamodule.setup()
    module = build_module(cfg, datamodule, build_model(cfg, datamodule))
    rows = RowIds()
    nodes = int(os.environ["WORLD_SIZE"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=nodes, strategy="ddp", max_epochs=2,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[rows])  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    state = {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    config = OmegaConf.to_container(cfg.data, resolve=True)
    torch.save({"rows": dict(rows.rows), "state": state, "world": trainer.world_size, "data": config},
               out / f"rank{trainer.global_rank}.pt")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
