"""A few epochs of each named loss method, on one process or under DDP; each rank saves its final state.

Used by tests/test_ddp.py (a helper, not a test module). Under DDP, Lightning's launcher runs this
script again for rank 1; the process group then stays up across the methods, so one launch covers them all.

    python tests/ddp_worker.py OUT_DIR DEVICES BATCH_SIZE SPEC [SPEC ...]

SPEC is ``<loss>`` or ``<loss>:<key>=<value>,...``: ``loss.<key>`` overrides (``mgda:grad_source=representation``),
or, with a leading ``@``, any override (``equal:@backbone=mmoe,@module.conflict.affinity_every_n_steps=2``).
Special SPECs: ``nan`` (rank 1 alone sees a NaN loss at step 3; records the error each rank raised; must come
last: Lightning ends the processes after an error) and ``nan_skip`` (the same with ``module.nonfinite=skip``).
Each rank writes ``OUT_DIR/<file_name(SPEC)>-rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mtl_experiments.errors import NonFiniteLossError
from mtl_experiments.pipeline import build, build_model, build_module

CONF = Path(__file__).resolve().parents[1] / "conf"
# 128 training rows: 4 steps per epoch at a global batch of 32 (the ranks' batches together)
DATA = ["data.num_samples=160", "data.input_dim=8", "backbone.tower_dims=[4]"]
EPOCHS = 2  # DWA's epoch means are recorded from the first epoch's end on (its weights move in the third)


def file_name(spec: str) -> str:
    return spec.replace(":", "-").replace("=", "_").replace(",", "+")


def build_module_for(spec: str, batch_size: int, overrides: tuple[str, ...] = ()):
    """The datamodule and the module ``python train.py loss=<spec> ...`` would train, seeded as it would be."""
    name, _, options = spec.partition(":")
    loss = [o[1:] if o.startswith("@") else f"loss.{o}" for o in options.split(",") if o]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=[f"loss={name}", *loss, *DATA, f"data.batch_size={batch_size}", *overrides],
        )
    pl.seed_everything(cfg.seed)
    datamodule = build(cfg, "data")
    datamodule.setup()
    return datamodule, build_module(cfg, datamodule, build_model(cfg, datamodule))


def _trainer(devices: int, **kwargs) -> pl.Trainer:
    """A CPU trainer, DDP over ``devices`` processes when > 1, with no validation, logger, checkpoints or bars."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def run(
    spec: str,
    devices: int,
    batch_size: int,
    precision: str = "32-true",
    epochs: int = EPOCHS,
    overrides: tuple[str, ...] = (),
) -> dict:
    """Train ``spec`` for ``epochs`` epochs (no validation); the final parameters, buffers and logged history."""
    datamodule, module = build_module_for(spec, batch_size, ("module.conflict.every_n_steps=1", *overrides))
    trainer = _trainer(devices, precision=precision, max_epochs=epochs)
    trainer.fit(module, datamodule=datamodule)
    tracker = module.conflict_tracker
    return {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "steps": trainer.global_step,
        "state": {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)},
        "weights": torch.stack([w for _, w, _ in tracker.history]) if tracker is not None else None,
        "grad_norms": torch.stack([n for _, _, n in tracker.history]) if tracker is not None else None,
        "log_values": {k: v.detach().clone() for k, v in module.weighting.log_values().items()},
        # Σ over the measured steps of every conflict metric (gates and lookahead affinity included)
        "conflict": {k: m.sum.clone() for k, m in tracker._all_metrics().items()} if tracker is not None else {},
    }


class _NaNOnRankOne(pl.Callback):
    """Rank 1 alone gets a NaN feature at its third batch: its losses are NaN, rank 0's are finite."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and batch_idx == 2:
            batch["features"]["numeric"][0, 0] = float("nan")


def run_nan(devices: int, batch_size: int, nonfinite: str) -> dict:
    datamodule, module = build_module_for("equal", batch_size, (f"module.nonfinite={nonfinite}",))
    trainer = _trainer(devices, max_epochs=1, callbacks=[_NaNOnRankOne()])
    try:
        trainer.fit(module, datamodule=datamodule)
    except NonFiniteLossError as e:
        return {"rank": trainer.global_rank, "error": type(e).__name__, "message": str(e), "steps": trainer.global_step}
    return {
        "rank": trainer.global_rank,
        "error": None,
        "steps": trainer.global_step,
        "skipped": module.nonfinite_skipped,
        "state": {k: v.detach().clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)},
    }


def main(argv: list[str]) -> None:
    out, devices, batch_size, specs = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        if spec in ("nan", "nan_skip"):
            result = run_nan(devices, batch_size, "stop" if spec == "nan" else "skip")
        else:
            result = run(spec, devices, batch_size)
        torch.save(result, out / f"{file_name(spec)}-rank{result['rank']}.pt")
        if result.get("error"):  # Lightning ends the other processes after an error: nothing more can run
            return


if __name__ == "__main__":
    main(sys.argv[1:])
