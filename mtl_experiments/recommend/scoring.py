"""Serve a trained model: the top-K items for given users, with each task's score and a combined ranking score
(``mtl-recommend``, ``scripts/recommend.py``): the scoring.

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

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.errors import ConfigError

FUSIONS = ("product", "sum")


def fusion_weights(tasks: Mapping[str, Any], fusion: str = "product", weights: Mapping[str, float] | None = None):
    """``{task: weight}`` for every task (0 = not fused), checked against the fusion: ConfigError for an unknown
    fusion or task, a task the fusion cannot take (``Task.fusions``), a non-finite weight, or nothing left to
    rank by. Default: weight 1 for the tasks whose kind enters this fusion by default (``Task.fused_by_default``)."""
    checks.choice("fusion", fusion, FUSIONS)
    if weights is None:
        out = {name: 1.0 if fusion in task.fused_by_default else 0.0 for name, task in tasks.items()}
    else:
        unknown = sorted(set(weights) - set(tasks))
        if unknown:
            raise ConfigError(f"--weights names unknown task(s) {unknown}; this model's tasks are {list(tasks)}.")
        out = {name: checks.number(f"weights.{name}", weights.get(name, 0.0)) for name in tasks}
        for name, w in out.items():
            task = tasks[name]
            if w != 0 and fusion not in task.fusions:
                other = [f for f in FUSIONS if f in task.fusions]
                hint = f" (it enters {other[0]} fusion: use --fusion {other[0]})" if other else ""
                kinds = sorted({t.kind for t in tasks.values() if fusion in t.fusions})
                raise ConfigError(
                    f"Task {name!r} ({task.kind}) cannot enter {fusion} fusion{hint}; {fusion} fuses "
                    f"{' and '.join(kinds) or 'no'} tasks of this model. Give it weight 0 or leave it out of --weights."
                )
    if not any(out.values()):
        raise ConfigError(
            f"Nothing to rank by: no task has a non-zero weight in {fusion} fusion (tasks: "
            + ", ".join(f"{n} ({t.kind})" for n, t in tasks.items())
            + "). Give one with --weights task=1."
        )
    return out


def check_k(key: str, k: Any, num_items: int) -> int:
    """``k`` items per user: an integer between 1 and the catalogue size."""
    return checks.integer(key, k, low=1, high=num_items, hint=f"1 to the catalogue size, {num_items}")


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
    item (``Task.item_scores``, ``batch_size`` items per forward); the others (retrieval) score the catalogue from
    one query, the user's row with the item unknown (id 0: the model's new-item representation), as
    ``Task.catalogue_scores`` (p_i = softmax_i(q·e_i / τ) over all items)."""
    device = next(model.parameters()).device

    def forward(ids: Tensor) -> dict[str, Tensor]:
        return model({k: v.to(device) for k, v in catalog.features(user_id, ids, user_values).items()})

    pointwise = {name: task for name, task in tasks.items() if task.pointwise}
    parts: dict[str, list[Tensor]] = {name: [] for name in pointwise}
    for lo in range(0, len(item_ids) if pointwise else 0, batch_size):  # no pointwise task: no per-item forward
        outputs = forward(item_ids[lo : lo + batch_size])
        for name, task in pointwise.items():
            parts[name].append(task.item_scores(outputs[name]).cpu())
    out = {name: torch.cat(p) for name, p in parts.items()}
    catalogue = [name for name in tasks if name not in pointwise]
    if catalogue:
        outputs = forward(torch.zeros(1, dtype=torch.long))
        for name in catalogue:  # column j: item j + 1
            out[name] = tasks[name].catalogue_scores(outputs[name])[0].cpu()[item_ids - 1]
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
    k = check_k("k", k, catalog.num_items)
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
