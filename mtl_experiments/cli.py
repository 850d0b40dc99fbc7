"""``mtl-train`` / ``python train.py``: the Hydra entry point over ``pipeline.train``.

Start-up stays light: Hydra composes the config, ``schema.validate`` checks every value, and only then is the
pipeline (Lightning, MLflow, torch) imported, so ``--help`` and a bad value answer in about a second. A bad value,
or an override Hydra cannot apply, is one line on stderr and exit code 2, with nothing recorded.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig

from mtl_experiments import schema
from mtl_experiments.errors import MTLError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
FULL_ERROR = "HYDRA_FULL_ERROR"  # Hydra re-raises what it cannot compose (instead of printing it and exiting 1)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def run(cfg: DictConfig) -> float | None:
    """One job: the config checked, then trained and tested; an MTLError is one line and exit code 2."""
    try:
        schema.validate(cfg)  # before anything heavy is imported: a bad value costs about a second
        from mtl_experiments.pipeline import train  # Lightning, MLflow and torch come with it

        # Lightning installs its own console handler; route its records through Hydra's logging instead
        # (one line per message, with timestamps, also written to the run's log file).
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).handlers.clear()
            logging.getLogger(name).propagate = True
        return train(cfg)
    except MTLError as e:  # our errors already say what is wrong and how to fix it: no traceback
        print(f"Error: {e}", file=sys.stderr)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra marks this job FAILED, runs the rest of the sweep, and fails at the end
        sys.exit(2)


def main() -> float | None:
    """Runs ``run`` under Hydra; an override Hydra cannot compose (a key the chosen option lacks, a missing option,
    a syntax error) becomes one ``Error:`` line that says what to use instead, exit code 2 (also a sweep that ended
    with a job refused by one of our errors; HYDRA_FULL_ERROR=1 keeps Hydra's tracebacks)."""
    asked = os.environ.get(FULL_ERROR) == "1"  # the user wants Hydra's full traceback: leave it to Hydra
    os.environ[FULL_ERROR] = "1"
    try:
        return run()
    except MissingConfigException as e:  # Hydra's own message lists the options, one per line: kept as it is
        if asked:
            raise
        print(f"Error: {e}", file=sys.stderr)
    except (ConfigCompositionException, OverrideParseException) as e:
        if asked:
            raise
        cause = f"\n{e.__cause__}" if e.__cause__ is not None else ""
        print(f"Error: {schema.composition_message(f'{e}{cause}')}", file=sys.stderr)
    except MTLError as e:  # a sweep's failed job, re-raised by Hydra at the sweep's end: one line, not a traceback
        if asked:
            raise
        print(f"Error: {e}", file=sys.stderr)
    finally:
        if not asked:
            os.environ.pop(FULL_ERROR, None)
    sys.exit(2)


if __name__ == "__main__":
    main()
