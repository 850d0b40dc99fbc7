"""Where a run writes, checked before it writes anything, and kept free of secrets.

- One folder per process: ``hydra.run.dir`` / ``hydra.sweep.dir`` end in ``${mtl.run_suffix:}``, six random hex
  characters drawn once per process (registered in ``mtl_experiments/__init__.py``), so runs launched in the same
  second never share an output or checkpoint folder.
- ``check_writable``: a folder can be created and written (a file is made and removed; nothing is created),
  else one ``StorageError`` naming the config key and the fix. A single run's config values (``schema.validate``)
  and Hydra's own output folder are checked in ``OutputsCallback.on_run_start``, before Hydra creates that folder
  (so a refused run leaves none, and a folder Hydra cannot make is our one line, not its traceback); the pipeline checks
  the rest (``paths.output_dir``, the checkpoint folders and a local artifact store) before any data is loaded.
- ``OutputsCallback.on_job_start`` masks secrets (``scrub.scrub_file``) in the ``.hydra/*.yaml`` files Hydra has
  just written for the job and in the sweep's ``multirun.yaml``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mtl_experiments import schema
from mtl_experiments.errors import MTLError, StorageError
from mtl_experiments.scrub import scrub_file

HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")


def check_writable(path: str | os.PathLike, key: str) -> Path:
    """``StorageError`` naming ``key`` unless ``path`` could be created and written. Creates nothing: a file is
    made and removed in the folder, or, if it does not exist yet, in its nearest existing parent (which must be a
    folder), so a run refused later leaves no empty folder behind."""
    given = path
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise StorageError(
            f"{key}={given} cannot be written ({reason}: {e.filename or existing}). Point {key} at a writable folder "
            "(or fix the folder's permissions, free the disk) and run again; nothing was trained or recorded."
        ) from None
    return path


def scrub_hydra_files(folder: str | os.PathLike) -> None:
    """Mask secrets in Hydra's saved config files of one job (``<output>/.hydra``)."""
    for name in HYDRA_FILES:
        scrub_file(Path(folder) / name)


class OutputsCallback(Callback):
    """Hydra callback (``conf/hydra/default.yaml``): the output folder is writable before Hydra makes it, and
    Hydra's copies of the config hold no secret."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # a bad value is refused before Hydra makes the run's folder (its .hydra/ copies and log file): a run that
        # never started leaves nothing behind (cli.run checks again, for configs run without this callback)
        exit_on_error(lambda: schema.validate(config, dict(config.hydra.runtime.choices)))
        exit_on_error(lambda: check_writable(config.hydra.run.dir, "hydra.run.dir"))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        exit_on_error(lambda: check_writable(config.hydra.sweep.dir, "hydra.sweep.dir"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra = config.hydra
        if hydra.output_subdir is not None:
            scrub_hydra_files(Path(hydra.runtime.output_dir) / hydra.output_subdir)
        if hydra.mode is not None and str(hydra.mode).endswith("MULTIRUN"):
            scrub_file(Path(str(hydra.sweep.dir)) / "multirun.yaml")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        scrub_file(Path(str(config.hydra.sweep.dir)) / "multirun.yaml")


def exit_on_error(check) -> None:
    """Run a start-up check inside a Hydra callback: our one-line error and exit code 2, not Hydra's traceback."""
    try:
        check()
    except MTLError as e:
        print(f"Error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
