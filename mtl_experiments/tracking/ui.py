"""Where the MLflow UI shows this project's runs: the experiment's kind and the links that open its runs.

MLflow 3's UI opens an experiment in its GenAI view (traces, an "Overview" page) unless told otherwise. It has
two switches, and which one counts depends on the version:

- the experiment tag ``mlflow.experimentKind`` (``custom_model_development``: model training), read by the UI
  of MLflow 3.0 - 3.4 (and by ``mlflow.genai`` tooling) to choose the view;
- the URL parameter ``workflowType=machine_learning`` (MLflow >= 3.5, workflow-based navigation), which
  outranks the browser's remembered choice (local storage ``mlflow.workflowType``, GenAI by default) and
  ignores the tag.

Every experiment this project creates gets the tag, and every link it prints carries the parameter, so both
kinds of UI open on the runs table (checked in a real browser: tests/tracking/test_ui.py).
"""

from __future__ import annotations

from urllib.parse import urlparse

from mtl_experiments.scrub import redact

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's value for "Model training" (GenAI: genai_development)
WORKFLOW_QUERY = "workflowType=machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local (SQLite) store


def ui_base(tracking_uri: str | None, configured: str | None = None) -> str:
    """The UI's address for a store: the server itself for http(s) (credentials removed), else where
    ``mlflow ui --backend-store-uri <store>`` serves it (``configured``, by default http://127.0.0.1:5000)."""
    parts = urlparse(tracking_uri or "")
    if parts.scheme in ("http", "https"):
        return redact(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]).geturl().rstrip("/"))
    return configured or DEFAULT_UI


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table (``<ui>/#/experiments/<id>/runs?workflowType=machine_learning``)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{WORKFLOW_QUERY}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page (``<ui>/#/experiments/<id>/runs/<run id>?workflowType=machine_learning``)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_QUERY}"


def open_command(tracking_uri: str) -> str | None:
    """The command that serves a local store's UI (None for a server, which is its own UI)."""
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return None
    return f"mlflow ui --backend-store-uri {redact(tracking_uri)}"


def mark_model_training(client, experiment) -> None:
    """Tag the experiment as model training, unless someone chose its kind already (a user's choice stays)."""
    if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
