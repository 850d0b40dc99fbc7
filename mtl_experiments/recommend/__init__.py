"""Serve a trained model: the top-K items for given users, with each task's score and a combined ranking score
(``mtl-recommend``, ``scripts/recommend.py``).

The model comes from a checkpoint (``--checkpoint``) or an MLflow run (``--run-id``: its best checkpoint). A
checkpoint carries the run's resolved config (``checkpoint["mtl"]["config"]``), which rebuilds the dataset (for
its ``Catalog`` of users and items) and the model; the weights are the checkpoint's ``model.*`` tensors.

For a user, pointwise tasks score every catalogue item in one row per item (``Catalog.features``: the user's
columns repeated, the item's columns per row), batched over items: ``predict`` gives a probability for binary
tasks, a value for regression and, for multiclass tasks, the most likely class (shown, never fused: there is no
per-item score to rank by). A retrieval task scores the whole catalogue from one query vector per user, computed on
the user's row with the item unknown (id 0, the model's new-item representation: a query that does not depend on
the candidate), as p_i = softmax_i(q·e_i / τ) over all items. The items are ranked by a fusion of the task
scores with weights w_t:

  product:  Σ_t w_t · log p_t   (the log of the weighted product Π_t p_t^w_t of probabilities; the same ranking)
  sum:      Σ_t w_t · s_t       (probabilities and regression values as they are)

Default weights: 1 for every binary task (``product``), 1 for every binary and regression task (``sum``);
``weights`` replaces them (a task not named gets 0: shown, not fused). Regression values are no probabilities,
so they enter ``sum`` only. Retrieval tasks enter either fusion only when weighted: their probability answers
another question (which one item among all, summing to 1 over the catalogue: about 1/I each) than a pointwise
task's (this item, yes or no), so in ``sum`` it would all but vanish at the default weight and in ``product`` it
mixes two kinds of evidence; the user who wants it chooses its weight.

A user id the dataset does not know is scored as a new user: id 0 (the model's new-user representation, as for
users never seen in training) with the feature values given for it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mtl_experiments.errors import ConfigError, MTLError, TrackingError

FUSIONS = ("product", "sum")
FUSABLE = {"product": ("binary", "retrieval"), "sum": ("binary", "regression", "retrieval")}
DEFAULT_FUSED = {"product": ("binary",), "sum": ("binary", "regression")}
BEST_ARTIFACT, LAST_ARTIFACT = "best.ckpt", "last.ckpt"


# -- scoring --------------------------------------------------------------------------------------------------
def fusion_weights(tasks: Mapping[str, Any], fusion: str = "product", weights: Mapping[str, float] | None = None):
    """``{task: weight}`` for every task (0 = not fused), checked against the fusion: ConfigError for an unknown
    fusion or task, a task kind the fusion cannot take, a non-finite weight, or nothing left to rank by."""
    if fusion not in FUSIONS:
        raise ConfigError(f"Unknown fusion {fusion!r}; choose one of {list(FUSIONS)}.")
    if weights is None:
        out = {name: 1.0 if task.kind in DEFAULT_FUSED[fusion] else 0.0 for name, task in tasks.items()}
    else:
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ConfigError(f"--weights names unknown task(s) {unknown}; this model's tasks are {list(tasks)}.")
        out = {name: float(weights.get(name, 0.0)) for name in tasks}
        bad = {n: w for n, w in out.items() if not math.isfinite(w)}
        if bad:
            raise ConfigError(f"Fusion weights must be finite numbers, got {bad}.")
        for name, w in out.items():
            kind = tasks[name].kind
            if w != 0 and kind not in FUSABLE[fusion]:
                hint = " (its values are no probabilities; use --fusion sum)" if kind == "regression" else ""
                raise ConfigError(
                    f"Task {name!r} ({kind}) cannot enter {fusion} fusion{hint}; {fusion} fuses "
                    f"{' and '.join(FUSABLE[fusion])} tasks. Give it weight 0 or leave it out of --weights."
                )
    if not any(out.values()):
        raise ConfigError(
            f"Nothing to rank by: no task has a non-zero weight in {fusion} fusion (tasks: "
            + ", ".join(f"{n} ({t.kind})" for n, t in tasks.items())
            + "). Give one with --weights task=1."
        )
    return out


def item_scores(task, output: Tensor) -> Tensor:
    """One score per row (a pointwise task): the probability or value of the row's item; for multiclass tasks, the
    most likely class."""
    pred = task.predict(output)
    return pred.argmax(-1) if pred.dim() == 2 else pred


@torch.inference_mode()
def score_items(
    model: torch.nn.Module,
    catalog,
    tasks: Mapping[str, Any],
    user_id: int,
    item_ids: Tensor,
    user_values: Mapping[str, float | int] | None = None,
    batch_size: int = 8192,
) -> dict[str, Tensor]:
    """``{task: Tensor[N]}``: every task's score of ``item_ids`` for one user. Pointwise tasks score one row per
    item (``batch_size`` items per forward); retrieval tasks score the catalogue from one query, the user's row
    with the item unknown (id 0: the model's new-item representation), as p_i = softmax_i(q·e_i / τ) over all
    items."""
    device = next(model.parameters()).device

    def forward(ids: Tensor) -> dict[str, Tensor]:
        return model({k: v.to(device) for k, v in catalog.features(user_id, ids, user_values).items()})

    pointwise = {name: task for name, task in tasks.items() if task.kind != "retrieval"}
    parts: dict[str, list[Tensor]] = {name: [] for name in pointwise}
    for lo in range(0, len(item_ids) if pointwise else 0, batch_size):  # no pointwise task: no per-item forward
        outputs = forward(item_ids[lo : lo + batch_size])
        for name, task in pointwise.items():
            parts[name].append(item_scores(task, outputs[name]).cpu())
    out = {name: torch.cat(p) for name, p in parts.items()}
    retrieval = [name for name in tasks if name not in pointwise]
    if retrieval:
        outputs = forward(torch.zeros(1, dtype=torch.long))
        for name in retrieval:
            # predict: the scores of items 1..I (column j = item j + 1)
            probs = torch.softmax(tasks[name].predict(outputs[name])[0].double(), dim=0).cpu()
            out[name] = probs[item_ids - 1]
    return {name: out[name] for name in tasks}


def fuse(scores: Mapping[str, Tensor], fusion: str, weights: Mapping[str, float]) -> Tensor:
    """The ranking score per item (float64): ``Σ w_t log p_t`` (product) or ``Σ w_t s_t`` (sum)."""
    total = torch.zeros(len(next(iter(scores.values()))), dtype=torch.float64)
    tiny = torch.finfo(torch.float64).tiny  # log 0 would be -inf for every item a task rules out: order kept
    for name, w in weights.items():
        if w == 0:
            continue
        s = scores[name].double()
        total += w * (torch.log(s.clamp_min(tiny)) if fusion == "product" else s)
    return total


def recommend(
    model: torch.nn.Module,
    catalog,
    tasks: Mapping[str, Any],
    user_id: int,
    k: int = 10,
    *,
    user_features: Mapping[str, Any] | None = None,
    exclude_seen: bool = False,
    fusion: str = "product",
    weights: Mapping[str, float] | None = None,
    batch_size: int = 8192,
) -> list[dict[str, Any]]:
    """The top-``k`` items for ``user_id`` by fused score (ties: smaller item id first), as rows
    ``{"user_id", "rank", "item_id", "score", "tasks": {task: score}}``.

    ``user_features`` (raw values or ids, every user column; see ``Catalog.encode_user``) describe a user the
    dataset does not know (scored as user 0, the new-user representation) or replace a known user's feature
    values. ``exclude_seen`` drops the items the user interacted with in training (fewer than ``k`` rows may be
    left)."""
    k = int(k)
    if not 1 <= k <= catalog.num_items:
        raise ConfigError(f"K must be between 1 and the catalogue size {catalog.num_items}, got {k}.")
    fused_weights = fusion_weights(tasks, fusion, weights)
    user_id = int(user_id)
    known = catalog.knows_user(user_id)
    if not known and user_features is None:
        raise ConfigError(
            f"User {user_id} is unknown to this dataset (its users are 1..{catalog.num_users}). To score a new user, "
            f"give all its features: --user-features {','.join(f'{c}=...' for c in catalog.user_columns)}."
        )
    user_values = catalog.encode_user(user_features) if user_features is not None else None
    scored_as = user_id if known else 0
    item_ids = torch.arange(1, catalog.num_items + 1)
    if exclude_seen and known:
        item_ids = item_ids[~torch.isin(item_ids, catalog.seen_items(user_id))]
    if len(item_ids) == 0:
        return []
    model.eval()
    scores = score_items(model, catalog, tasks, scored_as, item_ids, user_values, batch_size)
    total = fuse(scores, fusion, fused_weights)
    # item_ids ascend, so a stable descending sort breaks ties by the smaller id
    order = torch.sort(total, descending=True, stable=True).indices[:k]
    rows = []
    for rank, i in enumerate(order.tolist(), start=1):
        rows.append(
            {
                "user_id": user_id,
                "rank": rank,
                "item_id": int(item_ids[i]),
                "score": float(total[i]),
                "tasks": {name: _plain(s[i]) for name, s in scores.items()},
            }
        )
    return rows


def _plain(x: Tensor) -> float | int:
    return int(x) if not x.is_floating_point() else float(x)


# -- loading a trained model ----------------------------------------------------------------------------------
@dataclass
class Served:
    """A model ready to score: the model (eval mode), the dataset's catalogue and tasks, and where it came from."""

    model: torch.nn.Module
    catalog: Any
    tasks: dict[str, Any]
    checkpoint: str
    datamodule: Any = None  # the set-up dataset the catalogue comes from
    notes: list[str] = field(default_factory=list)


def load_checkpoint(
    path: str | Path, device: str = "cpu", fallback_config: Callable[[], str | None] | None = None
) -> Served:
    """Rebuild the dataset and model from the checkpoint's config and load its weights. ``fallback_config``
    gives the config YAML of a checkpoint that carries none (the run's config artifact)."""
    from omegaconf import OmegaConf

    from mtl_experiments import checkpoints, pipeline

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"--checkpoint {path}: no such file.")
    ckpt = checkpoints.load(path)
    config_yaml = (ckpt.get("mtl") or {}).get("config") or (fallback_config() if fallback_config else None)
    if not config_yaml:
        raise ConfigError(
            f"{path} carries no run config (checkpoint['mtl']['config']), so its model cannot be rebuilt; "
            "checkpoints written by this version of train.py carry it: retrain, or pass --run-id of a run whose "
            "config artifact (config/config.yaml) describes it."
        )
    state = {k[len("model.") :]: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith("model.")}
    if not state:
        raise ConfigError(f"{path} holds no model weights (no 'model.*' keys in its state_dict).")
    cfg = OmegaConf.create(config_yaml)
    datamodule = pipeline.build(cfg, "data")
    datamodule.setup()
    if getattr(datamodule, "catalog", None) is None:
        raise ConfigError(
            f"The dataset of this model ({OmegaConf.select(cfg, 'data._target_')}) has no catalogue of users and "
            "items, so it cannot serve recommendations; datasets that can set `catalog` in load() "
            "(e.g. data=recsys_synthetic)."
        )
    model = pipeline.build_model(cfg, datamodule)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(
            f"The weights in {path} do not fit the model its config builds ({str(e).splitlines()[0][:300]}); "
            "it was written by a different version of the code or config."
        ) from None
    model.to(device).eval()
    return Served(model, datamodule.catalog, dict(datamodule.tasks), str(path), datamodule)


def best_local_checkpoint(folder: Path) -> tuple[Path | None, str | None]:
    """The best checkpoint in a run's checkpoint folder, and a note when it is not the recorded best.

    The recorded best is the monitoring ``ModelCheckpoint``'s ``best_model_path`` in ``last.ckpt`` (written
    after validation, so it knows the final best); failing that, the newest other ``*.ckpt`` (the default
    callbacks name it ``best-epochNNN.ckpt``); failing that ``last.ckpt`` (with a note)."""
    from mtl_experiments import checkpoints

    last = folder / "last.ckpt"
    if last.is_file():
        for state in (checkpoints.load(last).get("callbacks") or {}).values():
            best = state.get("best_model_path") if isinstance(state, dict) else None
            # the file of that name in this folder first: the folder may have been copied or moved since
            for candidate in (folder / Path(best).name, Path(best)) if best else ():
                if candidate.is_file():
                    return candidate, None
    others = sorted((p for p in folder.glob("*.ckpt") if p.name != "last.ckpt"), key=lambda p: p.stat().st_mtime)
    if others:
        return others[-1], None
    if last.is_file():
        return last, f"no best checkpoint in {folder}: using last.ckpt (the final weights, not the best by validation)"
    return None, None


def load_run(run_id: str, tracking_uri: str | None = None, device: str = "cpu") -> Served:
    """The best checkpoint of an MLflow run: in its checkpoint folder (tag ``mtl.checkpoint_dir``), else its
    artifact ``checkpoints/best.ckpt``; ``last.ckpt`` (folder, then artifact) with a note when there is no best."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from mtl_experiments import tracking
    from mtl_experiments.compare import check_readable

    os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")  # no download bars in the output
    uri = tracking.resolve_tracking_uri(tracking_uri)
    check_readable(uri)  # an SQLite file that is not there is an error (MLflow would create an empty store)
    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise ConfigError(
            f"No run {run_id} in the MLflow store {tracking.redact(uri)} ({tracking.redact(e.message)[:200]}). "
            "Pass the Run ID shown in the MLflow UI and the store it was tracked in (--tracking-uri)."
        ) from None
    except Exception as e:  # noqa: BLE001 - a store that fails to answer: one readable message
        raise TrackingError(
            f"Reading run {run_id} from {tracking.redact(uri)} failed: {tracking.redact(str(e))}"
        ) from e

    notes: list[str] = []
    folder = run.data.tags.get(tracking.CHECKPOINT_DIR_TAG)
    path, note = best_local_checkpoint(Path(folder)) if folder and Path(folder).is_dir() else (None, None)
    try:
        artifacts = {Path(a.path).name for a in client.list_artifacts(run_id, tracking.CHECKPOINT_ARTIFACTS)}
    except Exception:  # noqa: BLE001 - no artifact store reachable: only the local folder counts
        artifacts = set()
    if note and BEST_ARTIFACT in artifacts:  # a best by validation beats a local last.ckpt
        path, note = None, None
    with tempfile.TemporaryDirectory() as tmp:
        if path is None:
            name = (
                BEST_ARTIFACT if BEST_ARTIFACT in artifacts else LAST_ARTIFACT if LAST_ARTIFACT in artifacts else None
            )
            if name is None:
                host = run.data.tags.get(tracking.HOST_TAG)
                where = f"in {folder}" + (f" (written on host {host})" if host else "") if folder else "no folder tag"
                raise ConfigError(
                    f"Run {run_id} has no checkpoint: none {where}, and no artifact "
                    f"{tracking.CHECKPOINT_ARTIFACTS}/{{{BEST_ARTIFACT},{LAST_ARTIFACT}}}. Train with the default "
                    "callbacks (they write best-epochNNN.ckpt and last.ckpt) on this machine, or with "
                    "callbacks.last_checkpoint.log_to_mlflow=true to upload them to the run; or pass --checkpoint PATH."
                )
            path = Path(client.download_artifacts(run_id, f"{tracking.CHECKPOINT_ARTIFACTS}/{name}", tmp))
            if name == LAST_ARTIFACT:
                note = f"run {run_id} has no best checkpoint: using its artifact last.ckpt (the final weights)"
        if note:
            notes.append(note)
        served = load_checkpoint(path, device=device, fallback_config=lambda: _config_artifact(client, run_id))
    served.notes = notes
    if not Path(served.checkpoint).is_file():  # a downloaded copy, now gone
        served.checkpoint = f"runs:/{run_id}/{tracking.CHECKPOINT_ARTIFACTS}/{Path(served.checkpoint).name}"
    return served


def _config_artifact(client, run_id: str) -> str | None:
    """The run's resolved config artifact (``config/config.yaml``), for checkpoints that do not carry one."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(client.download_artifacts(run_id, "config/config.yaml", tmp)).read_text()
    except Exception:  # noqa: BLE001 - optional: the checkpoint normally carries its config
        return None


# -- the command line -----------------------------------------------------------------------------------------
def _pairs(text: str, what: str) -> dict[str, str]:
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{what} takes key=value pairs separated by commas, got {part!r}.")
        out[key.strip()] = value.strip()
    return out


def parse_users(text: str) -> list[int]:
    try:
        users = [int(u) for u in text.split(",") if u.strip()]
    except ValueError:
        raise ConfigError(f"--users takes user ids separated by commas (e.g. 12,57), got {text!r}.") from None
    if not users:
        raise ConfigError("--users names no user id.")
    return users


def parse_weights(text: str) -> dict[str, float]:
    out = {}
    for name, value in _pairs(text, "--weights").items():
        try:
            out[name] = float(value)
        except ValueError:
            raise ConfigError(f"--weights {name}={value!r} is not a number.") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtl-recommend",
        description=(
            "Top-K items for given users from a trained model, with each task's score and a fused ranking score. "
            "Unknown user ids are scored as new users from --user-features."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="MLflow run id: its best checkpoint (local folder, else run artifact)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint written by train.py")
    p.add_argument("--tracking-uri", help="MLflow store of --run-id (default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    p.add_argument("--users", required=True, help="user ids, comma-separated, e.g. 12,57")
    p.add_argument(
        "--user-features",
        help="features of the users the dataset does not know (every user column), e.g. region=3,age_bucket=2",
    )
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    p.add_argument("--exclude-seen", action="store_true", help="drop items the user interacted with in training")
    p.add_argument("--fusion", choices=FUSIONS, default="product", help="product (default): Σ w log p; sum: Σ w s")
    p.add_argument("--weights", help="fusion weights replacing the defaults, e.g. click=1,like=2 (tasks not named: 0)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--device", default="cpu", help="torch device to score on (default cpu)")
    p.add_argument("--batch-size", type=int, default=8192, help="items per forward pass")
    return p


def format_table(results: Sequence[dict[str, Any]], task_names: Sequence[str]) -> str:
    """One block per user: rank, item, fused score and each task's score, fixed-width columns."""
    lines = []
    for block in results:
        head = f"user {block['user_id']}" + (" (new user, scored from --user-features)" if block["new_user"] else "")
        if block["excluded"]:
            head += f"; {block['excluded']} items seen in training excluded"
        lines.append(head)
        columns = ["rank", "item_id", "score", *task_names]
        rows = [
            [str(r["rank"]), str(r["item_id"]), f"{r['score']:.4f}"]
            + [f"{v:.4f}" if isinstance(v, float) else str(v) for v in (r["tasks"][n] for n in task_names)]
            for r in block["items"]
        ]
        widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)]
        lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
        lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        if not rows:
            lines.append("(no items left)")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``mtl-recommend`` / ``python scripts/recommend.py``; returns the exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        users = parse_users(args.users)
        weights = parse_weights(args.weights) if args.weights else None
        features = _pairs(args.user_features, "--user-features") if args.user_features else None
        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}.")
        if args.run_id:
            served = load_run(args.run_id, args.tracking_uri, device=args.device)
        else:
            served = load_checkpoint(args.checkpoint, device=args.device)
        catalog, tasks = served.catalog, served.tasks
        fused = fusion_weights(tasks, args.fusion, weights)  # bad weights fail before any user is scored
        if not 1 <= args.k <= catalog.num_items:
            raise ConfigError(f"--k must be between 1 and the catalogue size {catalog.num_items}, got {args.k}.")
        for note in served.notes:
            print(f"Note: {note}.", file=sys.stderr)
        results = []
        for user in users:
            known = catalog.knows_user(user)
            if known and features is not None:
                print(
                    f"Note: user {user} is known: scored with its own features, not --user-features.", file=sys.stderr
                )
            rows = recommend(
                served.model,
                catalog,
                tasks,
                user,
                args.k,
                user_features=None if known else features,
                exclude_seen=args.exclude_seen,
                fusion=args.fusion,
                weights=weights,
                batch_size=args.batch_size,
            )
            excluded = len(catalog.seen_items(user)) if args.exclude_seen and known else 0
            results.append({"user_id": user, "new_user": not known, "excluded": excluded, "items": rows})
    except MTLError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        out = {
            "checkpoint": served.checkpoint,
            "fusion": args.fusion,
            "weights": fused,
            "users": [
                {**b, "items": [{k: v for k, v in r.items() if k != "user_id"} for r in b["items"]]} for b in results
            ],
        }
        print(json.dumps(out, indent=1))
    else:
        print(
            f"checkpoint {served.checkpoint}; {args.fusion} fusion, weights "
            + ", ".join(f"{n}={w:g}" for n, w in fused.items() if w)
            + "\n"
        )
        print(format_table(results, list(tasks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
