"""MLflow specifics, one module per concern:

- ``store``: the tracking URI, the start-up check that the store answers and can be written, the experiment;
- ``metadata``: what a run records about itself (tags, params, config artifacts);
- ``logger``: ``ResilientMLFlowLogger`` (buffers through outages, skips resumed steps), final status, ``replay``;
- ``writer``: ``BackgroundWriter``, the one thread that writes the logger's queued metrics in order;
- ``resume``: reopening a resumed run;
- ``dataset``: the run's dataset as an MLflow dataset input, its console log as an artifact;
- ``ui``: the experiment kind and the links that open the MLflow UI on the runs;
- ``run``: ``with tracking.run(...) as run:`` — the loggers, continue-or-new, FAILED / KILLED, the outage report.

``python -m mtl_experiments.tracking replay <fallback dir>`` uploads what an outage left behind.
"""

from mtl_experiments.scrub import redact
from mtl_experiments.tracking.lifecycle import TrackedRun, build_loggers, run
from mtl_experiments.tracking.logger import ResilientMLFlowLogger, clean_key, log_artifacts, mark_failed, replay
from mtl_experiments.tracking.metadata import (
    CHECKPOINT_ARTIFACTS,
    CHECKPOINT_DIR_TAG,
    HOST_TAG,
    PARENT_RUN_ENV,
    RESUME_COUNT_TAG,
    ROLE_TAG,
    SWEEP_PARENT,
    SWEPT_ENV,
    changed_params,
    default_run_name,
    flatten,
    git_commit,
    host,
    is_run_path,
    log_config_artifacts,
    path_tags,
    run_params,
    run_tags,
    sweep_tags,
    swept_keys,
)
from mtl_experiments.tracking.resume import continue_run
from mtl_experiments.tracking.store import (
    DEFAULT_DB,
    check_tracking_uri,
    ensure_experiment,
    get_run,
    last_steps,
    launch_dir,
    mlflow_logger_node,
    preflight,
    resolve_tracking_uri,
    short_http_retries,
    store_lock,
)
from mtl_experiments.tracking.ui import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    experiment_url,
    open_command,
    run_url,
    ui_base,
)

__all__ = [
    "CHECKPOINT_ARTIFACTS",
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING",
    "SWEPT_ENV",
    "default_run_name",
    "experiment_url",
    "is_run_path",
    "open_command",
    "path_tags",
    "run_params",
    "run_url",
    "swept_keys",
    "ui_base",
    "CHECKPOINT_DIR_TAG",
    "DEFAULT_DB",
    "HOST_TAG",
    "PARENT_RUN_ENV",
    "RESUME_COUNT_TAG",
    "ROLE_TAG",
    "SWEEP_PARENT",
    "ResilientMLFlowLogger",
    "TrackedRun",
    "build_loggers",
    "changed_params",
    "check_tracking_uri",
    "clean_key",
    "continue_run",
    "ensure_experiment",
    "flatten",
    "get_run",
    "git_commit",
    "host",
    "last_steps",
    "launch_dir",
    "log_artifacts",
    "log_config_artifacts",
    "mark_failed",
    "mlflow_logger_node",
    "preflight",
    "redact",
    "replay",
    "resolve_tracking_uri",
    "run",
    "run_tags",
    "short_http_retries",
    "store_lock",
    "sweep_tags",
]
