"""The checkpoint of an MLflow run: its best (to serve, ``mtl-recommend --run-id``) or its last (to continue,
``resume=<run id>``). In the run's checkpoint folder (tag ``mtl.checkpoint_dir``) when this machine has it, else
the run's artifacts ``checkpoints/{best,last}.ckpt`` (``callbacks.last_checkpoint.log_to_mlflow=true``), downloaded.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mtl_experiments.errors import ConfigError
from mtl_experiments.scrub import redact
from mtl_experiments.tracking.metadata import CHECKPOINT_ARTIFACTS, CHECKPOINT_DIR_TAG, HOST_TAG

log = logging.getLogger(__name__)
BEST, LAST = "best.ckpt", "last.ckpt"
WHICH = ("best", "last")


def best_local_checkpoint(folder: Path) -> tuple[Path | None, str | None]:
    """The best checkpoint in a run's checkpoint folder, and a note when it is not the recorded best.

    The recorded best is the monitoring ``ModelCheckpoint``'s ``best_model_path`` in ``last.ckpt`` (written
    after validation, so it knows the final best); failing that, the newest other ``*.ckpt`` (the default
    callbacks name it ``best-epochNNN.ckpt``); failing that ``last.ckpt`` (with a note)."""
    from mtl_experiments import checkpoints

    last = folder / LAST
    if last.is_file():
        for state in (checkpoints.load(last).get("callbacks") or {}).values():
            best = state.get("best_model_path") if isinstance(state, dict) else None
            # the file of that name in this folder first: the folder may have been copied or moved since
            for candidate in (folder / Path(best).name, Path(best)) if best else ():
                if candidate.is_file():
                    return candidate, None
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != LAST), key=lambda p: p.stat().st_mtime)
    if others:
        return others[-1], None
    if last.is_file():
        return last, f"no best checkpoint in {folder}: using last.ckpt (the final weights, not the best by validation)"
    return None, None


def find(client_or_uri: Any, run: Any, which: str = "best", download_to: Path | None = None, fix: str = ""):
    """``(path, note)``: the run's ``which`` checkpoint and a note when it is not what was asked for.

    ``best``: the best in the run's folder (``best_local_checkpoint``), unless only its ``last.ckpt`` is there
    and the artifacts hold a ``best.ckpt``; else the artifact ``best.ckpt``, else ``last.ckpt`` (with a note).
    ``last``: ``last.ckpt`` in the folder, else the artifact ``last.ckpt``, downloaded with ``best.ckpt`` (so the
    continued run still knows its best). Artifacts are downloaded into ``download_to`` (default: a new temporary
    folder). ``client_or_uri``: an ``MlflowClient`` or a tracking URI; ``run``: an MLflow ``Run`` or its id;
    ``fix``: what the caller's user can do instead, appended to the ConfigError when there is no checkpoint."""
    from mlflow.tracking import MlflowClient

    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    client = MlflowClient(client_or_uri) if isinstance(client_or_uri, str) else client_or_uri
    run = client.get_run(run) if isinstance(run, str) else run
    folder = run.data.tags.get(CHECKPOINT_DIR_TAG)
    local = Path(folder) if folder and Path(folder).is_dir() else None
    if which == "last":
        path, note = (local / LAST, None) if local is not None and (local / LAST).is_file() else (None, None)
    else:
        path, note = best_local_checkpoint(local) if local is not None else (None, None)
    if path is not None and note is None:
        return path, None
    try:
        artifacts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACTS)}
        unlisted = ""
    except Exception as e:  # noqa: BLE001 - no artifact store reachable: only the local folder counts
        artifacts, unlisted = set(), f" (its artifacts could not be listed: {redact(str(e))[:200]})"
    wanted = [BEST, LAST] if which == "best" else [LAST]
    name = next((n for n in wanted if n in artifacts), None)
    if path is not None and name != BEST:  # a local last.ckpt is as good as an artifact one
        return path, note
    if name is None:
        raise _no_checkpoint(run, folder, wanted, unlisted, fix)
    fetch = [name] if which == "best" else sorted(artifacts & {BEST, LAST})
    target = _download(client, run.info.run_id, fetch, download_to)
    note = None
    if which == "best" and name == LAST:
        note = f"run {run.info.run_id} has no best checkpoint: using its artifact last.ckpt (the final weights)"
    return target / name, note


def _download(client, run_id: str, names: list[str], download_to: Path | None) -> Path:
    """``names`` of the run's checkpoint artifacts, downloaded into ``download_to``; the folder."""
    target = Path(download_to) if download_to is not None else Path(tempfile.mkdtemp(prefix="mtl-ckpt-"))
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            shutil.move(client.download_artifacts(run_id, f"{CHECKPOINT_ARTIFACTS}/{name}", tmp), target / name)
    log.info("Downloaded the checkpoints of run %s from its MLflow artifacts into %s.", run_id, target)
    return target


def _no_checkpoint(run, folder: str | None, wanted: list[str], unlisted: str, fix: str) -> ConfigError:
    host = run.data.tags.get(HOST_TAG)
    where = f"none in {folder}" + (f" (written on host {host})" if host else "") if folder else "no folder tag"
    names = wanted[0] if len(wanted) == 1 else "{" + ",".join(wanted) + "}"
    return ConfigError(
        f"Run {run.info.run_id} has no {'last ' if wanted == [LAST] else ''}checkpoint: {where}, and no "
        f"artifact {CHECKPOINT_ARTIFACTS}/{names}{unlisted}. Train with the default callbacks (they write "
        "best-epochNNN.ckpt and last.ckpt) on this machine, or with callbacks.last_checkpoint.log_to_mlflow=true "
        f"to upload them to the run{'; ' + fix if fix else ''}."
    )
