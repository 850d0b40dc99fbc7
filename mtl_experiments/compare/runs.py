"""Reading runs from an MLflow store: the selection (experiment, sweep parent, tags, segment), the FINISHED
runs with test metrics, and the skipped ones with the reason."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mtl_experiments.errors import ConfigError, TrackingError

PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "mtl.role"
SWEEP_PARENT = "sweep_parent"


@dataclass
class RunData:
    """What the comparison needs of one MLflow run (latest metric values)."""

    run_id: str
    run_name: str
    status: str
    experiment_id: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def from_mlflow(cls, run) -> RunData:
        return cls(
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            status=run.info.status,
            experiment_id=run.info.experiment_id,
            start_time=run.info.start_time or 0,
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=dict(run.data.tags),
        )

    def test_metrics(self) -> dict[str, float]:
        """``{"<task>/<metric>": value}`` from ``test/<task>/<metric>``: not ``test/mean_*`` and not the evaluation
        segments' keys (``test/cold_user/<task>/<metric>``, ``test/warm/mean_auroc``)."""
        out = {}
        for key, value in self.metrics.items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "test" and not parts[2].startswith("mean_"):
                out[f"{parts[1]}/{parts[2]}"] = value
        return out


@dataclass
class Selection:
    """The runs read from the store, and the ones skipped (reason -> run ids)."""

    tracking_uri: str
    runs: list[RunData]
    skipped: dict[str, list[str]] = field(default_factory=dict)
    experiments: list[str] = field(default_factory=list)
    parent_id: str | None = None
    filters: list[str] = field(default_factory=list)
    segment: str | None = None  # the evaluation segment whose test metrics are compared (None: the whole split)


def check_readable(uri: str) -> None:
    """Fail on a store that is not there: a missing SQLite file (MLflow would silently create an empty
    one) or a tracking server that does not answer."""
    from mtl_experiments import tracking

    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():  # MLflow would silently create an empty store here
            raise TrackingError(
                f"No MLflow store at {path}. Pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store "
                "your runs were tracked in, e.g. sqlite:////abs/path/mlflow.db or http://host:5000."
            )
    else:
        tracking.check_tracking_uri(uri)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def latest_sweep(client, experiment_ids: list[str]) -> str:
    """The run id of the most recently started sweep parent run (tag ``mtl.role=sweep_parent``)."""
    found = client.search_runs(
        experiment_ids,
        f"tags.`{ROLE_TAG}` = '{SWEEP_PARENT}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        raise ConfigError(
            f"No sweep parent run (tag {ROLE_TAG}={SWEEP_PARENT}) in the selected experiment(s); run a sweep "
            "with `python train.py -m ...` or pass --parent / --experiment instead."
        )
    return found[0].info.run_id


def full_run_id(client, run_id: str) -> str:
    """A run id from its full form or a unique prefix (the 8 characters the tools print)."""
    if len(run_id) == 32:
        return run_id
    from mlflow.entities import ViewType

    exp_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    # sweep parents first: the ids users copy from a sweep's last line; then every run
    for where in (f"tags.`{ROLE_TAG}` = '{SWEEP_PARENT}'", ""):
        found = {r.run_id for r in _search(client, exp_ids, where) if r.run_id.startswith(run_id.lower())}
        if len(found) == 1:
            return found.pop()
        if len(found) > 1:
            raise ConfigError(f"--parent {run_id} is ambiguous: {', '.join(sorted(found))}; give more characters.")
    raise ConfigError(f"--parent must be a run id (or its first characters) of the store, got {run_id!r}.")


def _experiments(client, uri: str, experiment: str | None, parent: str | None) -> tuple[list[str], list[str]]:
    """(ids, names) of the experiment named, else of the parent run's, else of all experiments."""
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ConfigError(f"No experiment {experiment!r} in {uri}; it has {names}.")
        return [exp.experiment_id], [exp.name]
    if parent:
        exp_id = client.get_run(parent).info.experiment_id
        return [exp_id], [client.get_experiment(exp_id).name]
    exps = client.search_experiments()
    return [e.experiment_id for e in exps], [e.name for e in exps]


def _search(client, experiment_ids: list[str], filter_string: str) -> list[RunData]:
    """Every active run matching ``filter_string``, page by page."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token
        )
        runs += [RunData.from_mlflow(r) for r in page]
        token = page.token
        if not token:
            return runs


def _use_segment(runs: list[RunData], segment: str) -> None:
    """The segment's test metrics (``test/<segment>/<task>/<metric>``) take the place of the whole split's."""
    prefix = f"test/{segment}/"
    for run in runs:
        test = {f"test/{k[len(prefix) :]}": v for k, v in run.metrics.items() if k.startswith(prefix)}
        run.metrics = {**{k: v for k, v in run.metrics.items() if not k.startswith("test/")}, **test}


def _keep_finished(runs: list[RunData], segment: str | None) -> tuple[list[RunData], dict[str, list[str]]]:
    """(FINISHED runs with test metrics, {reason: run ids} of the others), in start order."""
    kept, skipped = [], defaultdict(list)
    for run in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
        if run.tags.get(ROLE_TAG) == SWEEP_PARENT:
            skipped["sweep parent run (holds no results)"].append(run.run_id)
        elif run.status != "FINISHED":
            skipped[f"status {run.status}"].append(run.run_id)
        elif not run.test_metrics():
            skipped[f"no test/{segment + '/' if segment else ''}<task>/<metric> metrics"].append(run.run_id)
        else:
            kept.append(run)
    return kept, dict(skipped)


def load_runs(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    parent: str | None = None,
    latest: bool = False,
    tags: Mapping[str, str] | None = None,
    segment: str | None = None,
) -> Selection:
    """Runs of ``experiment`` (default: all; or the parent's), children of ``parent`` (or of the latest
    sweep) and with all ``tags``; only FINISHED runs with test metrics are kept, the rest listed by reason.
    ``segment`` (``warm``, ``cold_user``, ``cold_item``): compare on that evaluation segment's test metrics
    (``test/<segment>/<task>/<metric>``, read as ``test/<task>/<metric>``) instead of the whole test split's."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mtl_experiments.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)  # None: $MLFLOW_TRACKING_URI, else ./mlflow.db (made absolute)
    check_readable(uri)
    client = MlflowClient(uri)
    try:
        parent = full_run_id(client, parent) if parent else None
        exp_ids, exp_names = _experiments(client, uri, experiment, parent)
        if latest:
            parent = latest_sweep(client, exp_ids)
        filters = [f"tags.`{PARENT_TAG}` = {_quote(parent)}"] if parent else []
        filters += [f"tags.`{k}` = {_quote(str(v))}" for k, v in (tags or {}).items()]
        runs = _search(client, exp_ids, " and ".join(filters))
    except MlflowException as e:
        raise TrackingError(f"Reading runs from {uri} failed: {e.message}") from e

    if segment:
        _use_segment(runs, segment)
    kept, skipped = _keep_finished(runs, segment)
    names = dict(zip(exp_ids, exp_names, strict=True))
    # the header names the experiments the compared runs come from, not every one searched (MLflow's "Default")
    held = list(dict.fromkeys(names[r.experiment_id] for r in kept if r.experiment_id in names))
    return Selection(uri, kept, skipped, held or exp_names, parent, filters, segment)
