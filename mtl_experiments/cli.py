"""``mtl-train`` / ``python train.py``: the Hydra entry point over ``pipeline.train``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mtl_experiments.errors import MTLError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from mtl_experiments.pipeline import train  # imported here so `--help` and config errors stay fast

    # Lightning installs its own console handler; route its records through Hydra's logging instead
    # (one line per message, with timestamps, also written to the run's log file).
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    try:
        return train(cfg)
    except MTLError as e:  # our errors already say what is wrong and how to fix it: no traceback
        print(f"Error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job FAILED, runs the rest of the sweep, and fails at the end
        sys.exit(2)


if __name__ == "__main__":
    main()
