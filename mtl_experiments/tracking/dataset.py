"""What a run trained on, as an MLflow dataset input, and its console log, as an artifact.

The dataset (MLflow's ``Dataset`` entity, shown in the runs table's Dataset column and on the run page):

- name: the ``data`` option, with the file name for a file dataset (``tabular:interactions.csv``);
- source: the absolute path of ``data.path`` / ``data.root`` (source type ``local``), or for generated data the
  generator (source type ``code``);
- digest: sha256 (16 hex) of the tensors the run was given (train, val, test: every column, its dtype and shape),
  so two runs share a digest exactly when they saw the same rows in the same splits; for data streamed from disk
  (no tensors in memory, ``data=stream``) of its rows per split and feature spec only;
- schema: MLflow's column specs (``mlflow_colspec``) of the inputs, ids and labels (``label.<task>``; none when
  streamed);
- profile: ``num_rows`` and the rows of each split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mtl_experiments.scrub import redact
from mtl_experiments.tracking.store import launch_dir, short_http_retries

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SOURCE_KEYS = ("path", "root")  # where a dataset's files are (data.path: a file, data.root: a folder)
CONTEXT_TAG = "mlflow.data.context"
LOG_ARTIFACTS = "logs"  # the console log file(s) of the run
MLFLOW_TYPES = {torch.float32: "float", torch.float64: "double", torch.int64: "long", torch.int32: "integer"}


def tensor_columns(split: Mapping[str, Any], spec) -> dict[str, torch.Tensor]:
    """``{column name: Tensor[N]}`` of one split: numeric and categorical inputs by the feature spec's names, the
    ids and timestamp, the labels as ``label.<task>`` (evaluation segments are derived, not data)."""
    cols: dict[str, torch.Tensor] = {}
    features = split.get("features", {})
    for block, names in (("numeric", list(spec.numeric)), ("categorical", list(spec.categorical))):
        if block in features:
            cols.update({name: features[block][:, i] for i, name in enumerate(names)})
    cols.update({k: split[k] for k in ("user_id", "item_id", "timestamp") if k in split})
    cols.update({f"label.{task}": t for task, t in split["labels"].items()})
    return cols


def digest(splits: Mapping[str, Mapping[str, Any]], spec) -> str:
    """sha256 (16 hex) over every split's columns: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in SPLITS:
        for col, t in sorted(tensor_columns(splits[name], spec).items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}/{col}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def schema_json(split: Mapping[str, Any], spec) -> str:
    """MLflow's dataset schema (``{"mlflow_colspec": [...]}``, as its own datasets write it)."""
    from mlflow.types import ColSpec, Schema

    cols = [ColSpec(MLFLOW_TYPES.get(t.dtype, "binary"), name) for name, t in tensor_columns(split, spec).items()]
    return json.dumps({"mlflow_colspec": Schema(cols).to_dict()})


def source(data_cfg: Mapping[str, Any], choice: str | None) -> tuple[str, str, str]:
    """(name, source type, source JSON): the absolute file or folder, else the generator."""
    for key in SOURCE_KEYS:
        value = data_cfg.get(key)
        if value and "://" in str(value):  # a remote store (s3://, gs://): already absolute
            return f"{choice}:{str(value).rstrip('/').rsplit('/', 1)[-1]}", "local", json.dumps({"uri": redact(value)})
        if value:
            path = (launch_dir() / Path(str(value)).expanduser()).resolve()
            name = f"{choice}:{path.name}" if key == "path" else str(choice)
            return name, "local", json.dumps({"uri": redact(str(path))})
    return str(choice), "code", json.dumps({"generator": str(data_cfg.get("_target_"))})


def dataset_entity(datamodule, data_cfg: Mapping[str, Any], choice: str | None):
    """The MLflow ``Dataset`` of a set-up datamodule (see the module docstring)."""
    from mlflow.entities import Dataset

    from mtl_experiments.data.spec import num_rows

    splits, spec = datamodule.splits, datamodule.feature_spec
    name, source_type, where = source(data_cfg, choice or type(datamodule).__name__)
    if all(isinstance(splits.get(s), Mapping) for s in SPLITS):
        rows = {s: num_rows(splits[s]) for s in SPLITS}
        hashed, schema = digest(splits, spec), schema_json(splits["train"], spec)
    else:  # streamed: the rows stay on disk
        rows = {s: int(datamodule.split_rows[s]) for s in SPLITS}
        text = json.dumps({"rows": rows, "spec": spec.to_dict(), "source": where}, sort_keys=True)
        hashed, schema = hashlib.sha256(text.encode()).hexdigest()[:16], None
    profile = json.dumps({"num_rows": sum(rows.values()), **{f"{k}_rows": v for k, v in rows.items()}})
    return Dataset(name, hashed, source_type, where, schema, profile)


def log_dataset(logger, datamodule, data_cfg: Mapping[str, Any] | None, choice: str | None) -> None:
    """Log the run's dataset as an MLflow dataset input (context ``train``); a store failure only warns."""
    from mlflow.entities import DatasetInput, InputTag

    try:
        dataset = dataset_entity(datamodule, dict(data_cfg or {}), choice)
        with short_http_retries():
            logger.experiment.log_inputs(logger.run_id, [DatasetInput(dataset, [InputTag(CONTEXT_TAG, "train")])])
    except Exception as e:  # noqa: BLE001 - the run trains without its dataset record
        log.warning("Could not record the dataset as the run's MLflow input: %s", redact(str(e))[:300])


def log_files(logger) -> None:
    """Attach the console log (every file the root logger writes, e.g. Hydra's ``<job>.log``) under ``logs/``,
    secrets redacted; buffered like any artifact while the store is away."""
    for handler in logging.getLogger().handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        handler.flush()
        path = Path(handler.baseFilename)
        if not path.is_file():
            continue
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / path.name).write_text(redact(path.read_text(errors="replace")))
            try:
                logger.log_artifacts(tmp, LOG_ARTIFACTS)
            except Exception as e:  # noqa: BLE001 - the run's outcome stands without its log
                log.warning("Could not attach %s to the MLflow run: %s", path, redact(str(e))[:300])
