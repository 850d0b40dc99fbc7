"""Reopening a resumed run in MLflow."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger

from mtl_experiments.scrub import redact
from mtl_experiments.tracking.metadata import RESUME_COUNT_TAG
from mtl_experiments.tracking.store import short_http_retries

log = logging.getLogger(__name__)


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
