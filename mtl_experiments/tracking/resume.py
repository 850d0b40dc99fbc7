"""Resuming a run: the checkpoint of a run id, the steps it already logged, reopening it."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from mtl_experiments.errors import ConfigError
from mtl_experiments.scrub import redact
from mtl_experiments.tracking.metadata import CHECKPOINT_ARTIFACTS, CHECKPOINT_DIR_TAG, HOST_TAG, RESUME_COUNT_TAG
from mtl_experiments.tracking.store import short_http_retries

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


# -- resuming a run ------------------------------------------------------------------------------------
def run_checkpoint(uri: str, run, download_to: Path) -> Path:
    """The checkpoint ``resume=<run id>`` continues from: ``last.ckpt`` in the run's checkpoint folder
    (tag ``mtl.checkpoint_dir``), else the run's artifact ``checkpoints/last.ckpt`` (downloaded with
    ``checkpoints/best.ckpt`` into ``download_to``)."""
    from mlflow.tracking import MlflowClient

    run_id = run.info.run_id
    folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if folder and (Path(folder) / "last.ckpt").is_file():
        return Path(folder) / "last.ckpt"
    client = MlflowClient(uri)
    names = {Path(a.path).name for a in client.list_artifacts(run_id, CHECKPOINT_ARTIFACTS)}
    if "last.ckpt" in names:
        download_to.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            for name in sorted(names & {"last.ckpt", "best.ckpt"}):
                local = client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACTS}/{name}", tmp)
                shutil.move(local, download_to / name)
        log.info("Downloaded the checkpoints of run %s from its MLflow artifacts into %s.", run_id, download_to)
        return download_to / "last.ckpt"
    host = run.data.tags.get(HOST_TAG)
    where = f"{folder}/last.ckpt" + (f" (written on host {host})" if host else "") if folder else "no local folder"
    raise ConfigError(
        f"resume={run_id}: the run has no checkpoint to continue from: not at {where}, and no MLflow artifact "
        f"{CHECKPOINT_ARTIFACTS}/last.ckpt (callbacks.last_checkpoint.log_to_mlflow=true uploads it). Pass the "
        "checkpoint file instead: resume=/path/to/last.ckpt."
    )


def continue_run(
    logger: MLFlowLogger,
    run,
    params: Mapping[str, Any],
    changed: Mapping,
    checkpoint: str | os.PathLike,
    extra_tags: Mapping[str, str] | None = None,
) -> None:
    """Reopen a killed / failed / finished run: status RUNNING, the new params only (MLflow forbids
    changing a logged param; the changes are kept in a tag), resume count and source as tags."""
    from mlflow.entities import Param, RunTag

    client, run_id = logger.experiment, logger.run_id
    count = int(run.data.tags.get(RESUME_COUNT_TAG, "0")) + 1
    tags = {RESUME_COUNT_TAG: str(count), f"mtl.resume.{count}.checkpoint": redact(str(checkpoint))[:5000]}
    tags.update({k: str(v) for k, v in (extra_tags or {}).items() if v})
    if changed:
        diff = "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())
        tags[f"mtl.resume.{count}.changed_params"] = diff[:5000]
    new = [Param(k, str(v)[:250]) for k, v in params.items() if k not in run.data.params]
    with short_http_retries():
        client.update_run(run_id, status="RUNNING")
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i : i + 100])
    log.info("Resuming MLflow run %s (resume #%d, was %s) from %s.", run_id, count, run.info.status, checkpoint)
    if run.info.status == "RUNNING":
        log.warning(
            "Run %s was RUNNING: as a killed run stays. If it is in fact still training somewhere, stop that "
            "process: both would write to the same run and checkpoint folder.",
            run_id,
        )
