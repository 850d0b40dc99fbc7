"""A synthetic recommender log: users, items, impressions and several correlated feedback signals.

No paper defines this generator; its parts are the standard ones: the latent-factor (dot-product) model of
preference (Koren, Bell & Volinsky, "Matrix Factorization Techniques for Recommender Systems", IEEE Computer
2009), Zipf-like item exposure, and the click -> conversion structure of ESMM (Ma et al., SIGIR 2018). Every draw
comes from its own stream of ``numpy.random.SeedSequence(seed)``, so e.g. changing ``num_interactions``
keeps the same users and items.

World (d = ``latent_dim``, K = ``num_categories``):
  category centroids c_k ~ N(0, I_d); item i of category k(i) (uniform): v_i = √s·c_k(i) + √(1-s)·ε_i,
  s = ``category_strength``; user factors u ~ N(0, I_d); user activity a_u = exp(σ_a·N(0, 1)).
Features (all derived from the factors, so they carry signal for users and items never seen in training):
  user ``age_bucket`` (6 quantile buckets of a projection of u + noise), ``region`` (argmax of 8 random
  projections of u + Gumbel noise), ``activity_level`` (4 quantile buckets of a_u); item ``category``,
  ``price_bucket`` (5 quantile buckets of a projection of v + noise); numeric ``user_activity`` = log a_u / σ_a
  and ``item_log_duration`` (standardised log duration; durations are log-normal, median 120 s, partly set by v).
Impressions: user ∝ a_u, item ∝ Zipf (rank + 1)^-α over a seeded random popularity ranking
(α = ``popularity_exponent``; 0 = uniform), independent of the match (a randomised exposure, as in
KuaiRand's random-exposure log); timestamps uniform over ``time_span_days``, rows in time order.
Signals (x = u ⊙ v, every score below has unit variance):
  z_click = x·1/√d (the latent match u·v/√d); z_s = x·(ρ_s·1/√d + √(1-ρ²_s)·e_s) for s in like, watch_time,
  with e_s orthonormal and orthogonal to 1, so corr(z_s, z_click) = ρ_s = ``correlation[s]`` (and
  corr(z_like, z_watch) = ρ_like·ρ_watch); utility y_s = z_s + Σ_f b_s,f[feature f] + σ·N(0, 1) with
  per-bucket feature effects b ~ N(0, ``feature_effect_std``²) over the user and item categorical features.
  - ``click`` = 1[y_click > its (1 - ``click_rate``) quantile];
  - ``like`` = click · 1[y_like > its (1 - ``like_rate``) quantile]: only observed after a click (like <= click);
    ``like_rate`` is the share of impressions the user *would* like, so P(like | click) grows with ρ_like;
  - ``watch_time`` = log(1 + seconds watched), seconds = duration · sigmoid(y_watch) after a click and 0
    without one (nothing was watched): defined for every row, the regression target of E[log1p watch];
  - ``interest`` = 1 if the item's category is among the user's ``interest_top_k`` categories by affinity
    u·c_k/√d + ``interest_noise``·N(0, 1) (one draw per user and category: a property of the pair, not the row);
  - ``next_item`` (retrieval) = the item of the same user's next click after this row, 0 if there is none (a row
    without a label): next-item recommendation, as in sequential recommenders (e.g. SASRec, Kang & McAuley 2018).
Content vectors ("pretrained" item embeddings, ``content_dim`` >= d): q_i = r·Q v_i + √(1-r²)·η_i with Q a
random ``content_dim`` x d matrix of orthonormal columns and η ~ N(0, I), r = ``content_strength``: each
signal direction of q correlates r with v, and a linear map from q recovers v with R² ≈ r². Written as a
float32 ``.npy`` of shape [num_items + 1, content_dim], row = item id (row 0, the reserved id, is zeros).

Ids: every categorical column, ``user_id`` and ``item_id`` included, is 1-based; id 0 is reserved for an
unknown value (a cold user or item), as in the real-data modules. Batches carry ``user_id``, ``item_id`` and
``timestamp``; ``self.interactions`` keeps the whole log in time order (with ``next_item_id``, the item of the user's
next click, 0 if none). ``id_columns`` of the feature spec name ``user_id`` / ``item_id``; ``self.item_info`` holds
the catalogue size and item categories, ``self.catalog`` the user and item feature tables (for serving).
Splits (mtl_experiments/data/splits.py, seeded by ``seed``): ``random``, ``cold_user`` / ``cold_item`` (a
``cold_fraction`` share of users / items never seen in training), ``temporal`` (train on the first days).
Under ``cold_item`` a training row whose next click is a held-out item has no ``next_item`` label (0): a cold
item must not be trained even as a target.
Measured (one thread, 10k users, 5k items, d=16): 1M interactions generate in 0.7 s of CPU time and the
whole ``setup()`` (tensors, split, content file, catalogue) takes 0.9-1.1 s with any split mode; 10M interactions
(100k users, 50k items) 16 s of CPU and a 2.8 GB peak (the log is kept beside the split tensors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from mtl_experiments.data.base import FeatureSpec, ItemInfo, Split, TabularDataModule, _gather
from mtl_experiments.data.catalog import Catalog
from mtl_experiments.data.splits import check_split_options, split_rows
from mtl_experiments.errors import ConfigError

log = logging.getLogger(__name__)

SIGNALS: dict[str, str] = {
    "click": "binary",
    "like": "binary",
    "watch_time": "regression",
    "interest": "binary",
    "next_item": "retrieval",
}
SIGNAL_COLUMN = {"next_item": "next_item_id"}  # signals stored under another name in the log
# the task kinds a signal may train: a 0/1 signal can also be regressed, the others only as what they are
KINDS = {"binary": ("binary", "regression"), "regression": ("regression",), "retrieval": ("retrieval",)}
DEFAULT_TASKS = ("click", "like", "watch_time", "interest")  # tasks=None: these, each with its signal's kind
CORRELATED = ("like", "watch_time")  # signals whose latent score has a configurable correlation with click's
USER_FEATURES = {"age_bucket": 6, "region": 8, "activity_level": 4}  # name -> number of values (ids 1..n)
ITEM_FEATURES = ("category", "price_bucket")
PRICE_BUCKETS = 5
CATEGORICAL = ("user_id", "item_id", *USER_FEATURES, *ITEM_FEATURES)
NUMERIC = ("user_activity", "item_log_duration")
CONTENT_VERSION = 1  # bump when the content vectors' generation changes (part of the default file name)
_CHUNK = 1 << 20  # rows per chunk of the N x d products, bounding memory for tens of millions of rows
_STREAMS = ("users", "items", "effects", "log", "noise", "content", "split")


def _streams(seed: int) -> dict[str, np.random.Generator]:
    children = np.random.SeedSequence(int(seed)).spawn(len(_STREAMS))
    return {name: np.random.default_rng(s) for name, s in zip(_STREAMS, children, strict=True)}


def _buckets(score: np.ndarray, n: int) -> np.ndarray:
    """Equal-frequency buckets 1..n of ``score``."""
    edges = np.quantile(score, np.linspace(0, 1, n + 1)[1:-1])
    return np.searchsorted(edges, score).astype(np.int64) + 1


def _unit(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal(d)
    return a / np.linalg.norm(a)


def signal_directions(latent_dim: int, correlation: Mapping[str, float], rng: np.random.Generator) -> np.ndarray:
    """``W[d, 3]``: unit columns for click, like, watch_time; cos(w_s, w_click) = correlation[s]."""
    d = latent_dim
    ones = np.full(d, 1 / math.sqrt(d))
    # QR of [1, g1, g2] (Gaussian g): columns 2 and 3 are orthonormal and orthogonal to the all-ones direction
    q, _ = np.linalg.qr(np.column_stack([ones, rng.standard_normal((d, len(CORRELATED)))]))
    cols = [ones]
    for k, name in enumerate(CORRELATED):
        p = float(correlation[name])
        cols.append(p * ones + math.sqrt(max(0.0, 1 - p * p)) * q[:, k + 1])
    return np.column_stack(cols)


def generate(
    num_users: int,
    num_items: int,
    num_interactions: int,
    latent_dim: int = 16,
    num_categories: int = 20,
    category_strength: float = 0.5,
    popularity_exponent: float = 1.0,
    activity_sigma: float = 1.0,
    correlation: Mapping[str, float] | None = None,
    feature_effect_std: float = 0.3,
    noise_std: float = 1.0,
    click_rate: float = 0.2,
    like_rate: float = 0.2,
    interest_top_k: int = 3,
    interest_noise: float = 0.5,
    time_span_days: float = 30.0,
    seed: int = 0,
) -> dict:
    """The world and its log as numpy arrays (see the module docstring); ids are 1-based.

    Returns ``{"users": {...}, "items": {...}, "log": {...}}``: per-user arrays indexed by user id - 1,
    per-item arrays by item id - 1, and the log's columns (one row per impression, in time order).
    """
    corr = {name: 0.5 for name in CORRELATED} | dict(correlation or {})
    rng = _streams(seed)
    d = int(latent_dim)

    # users
    r = rng["users"]
    u = r.standard_normal((num_users, d), dtype=np.float32)
    log_activity = activity_sigma * r.standard_normal(num_users)
    users = {
        "factors": u,
        "age_bucket": _buckets(u @ _unit(r, d) + 0.5 * r.standard_normal(num_users), USER_FEATURES["age_bucket"]),
        "region": np.argmax(
            u @ r.standard_normal((d, USER_FEATURES["region"])) / math.sqrt(d)
            + r.gumbel(size=(num_users, USER_FEATURES["region"])),
            axis=1,
        ).astype(np.int64)
        + 1,
        "activity_level": _buckets(log_activity, USER_FEATURES["activity_level"]),
        "user_activity": (log_activity / activity_sigma if activity_sigma > 0 else log_activity).astype(np.float32),
    }

    # items
    r = rng["items"]
    centroids = r.standard_normal((num_categories, d), dtype=np.float32)
    category = r.integers(0, num_categories, num_items)
    s = float(category_strength)
    v = (math.sqrt(s) * centroids[category] + math.sqrt(1 - s) * r.standard_normal((num_items, d))).astype(np.float32)
    log_duration_std = 0.6 * (v @ _unit(r, d)) + 0.8 * r.standard_normal(num_items)  # unit variance
    ranking = r.permutation(num_items)  # ranking[k] = index of the (k+1)-th most popular item
    popularity = np.empty(num_items)
    popularity[ranking] = (np.arange(num_items) + 1.0) ** -float(popularity_exponent)
    items = {
        "factors": v,
        "centroids": centroids,
        "category": category.astype(np.int64) + 1,
        "price_bucket": _buckets(v @ _unit(r, d) + 0.5 * r.standard_normal(num_items), PRICE_BUCKETS),
        "item_log_duration": log_duration_std.astype(np.float32),
        "duration_seconds": (120.0 * np.exp(0.8 * log_duration_std)).astype(np.float32),
        "popularity": (popularity / popularity.sum()).astype(np.float32),
    }

    # the user x category interest table (one noisy affinity per pair; top-k per user)
    affinity = u @ centroids.T / math.sqrt(d) + interest_noise * rng["noise"].standard_normal(
        (num_users, num_categories), dtype=np.float32
    )
    top = np.argpartition(-affinity, interest_top_k - 1, axis=1)[:, :interest_top_k]
    interested = np.zeros((num_users, num_categories), dtype=bool)
    np.put_along_axis(interested, top, True, axis=1)
    users["interested_categories"] = interested

    # impressions
    r = rng["log"]
    n = int(num_interactions)
    activity = np.exp(log_activity - log_activity.max())  # shifted: no overflow for a large activity_sigma
    user_idx = r.choice(num_users, size=n, p=activity / activity.sum())
    item_idx = r.choice(num_items, size=n, p=popularity / popularity.sum())
    timestamp = np.sort(r.integers(0, max(1, int(time_span_days * 86400)), n))

    # per-signal feature effects, one table per categorical side feature
    r = rng["effects"]
    w = signal_directions(d, corr, r).astype(np.float32)
    sides = [  # (ids 1..n per user or item, n, the row's user or item index)
        *((users[f], n_values, user_idx) for f, n_values in USER_FEATURES.items()),
        (items["category"], num_categories, item_idx),
        (items["price_bucket"], PRICE_BUCKETS, item_idx),
    ]
    utility = np.empty((n, w.shape[1]), dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        utility[lo:hi] = (u[user_idx[lo:hi]] * v[item_idx[lo:hi]]) @ w
    for values, n_values, index in sides:
        effects = r.normal(0.0, feature_effect_std, (w.shape[1], n_values + 1)).astype(np.float32)
        utility += effects[:, values[index]].T
    utility += noise_std * rng["noise"].standard_normal((n, w.shape[1]), dtype=np.float32)

    click = utility[:, 0] > np.quantile(utility[:, 0], 1 - click_rate)
    like = click & (utility[:, 1] > np.quantile(utility[:, 1], 1 - like_rate))
    watched_share = 0.5 * (1 + np.tanh(utility[:, 2] / 2))  # sigmoid(y_watch), without exp overflow warnings
    seconds = np.where(click, items["duration_seconds"][item_idx] * watched_share, 0.0)
    interest = interested[user_idx, category[item_idx]]

    user_id, item_id = user_idx.astype(np.int64) + 1, item_idx.astype(np.int64) + 1
    log = {
        "user_id": user_id,
        "item_id": item_id,
        "timestamp": timestamp.astype(np.int64),
        "click": click.astype(np.float32),
        "like": like.astype(np.float32),
        "watch_time": np.log1p(seconds).astype(np.float32),
        "watch_seconds": seconds.astype(np.float32),
        "interest": interest.astype(np.float32),
        "next_item_id": next_positive_item(user_id, item_id, click),
    }
    return {"users": users, "items": items, "log": log}


def next_positive_item(user_id: np.ndarray, item_id: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """For each row (rows in time order), the item of the same user's next positive row after it; 0 if none."""
    order = np.lexsort((np.arange(len(user_id)), user_id))  # by user, then time
    users, items, pos = user_id[order], item_id[order], np.flatnonzero(positive[order])
    nxt = np.searchsorted(pos, np.arange(len(order)), side="right")
    found = nxt < len(pos)
    target = pos[np.minimum(nxt, max(len(pos) - 1, 0))] if len(pos) else np.zeros(len(order), np.int64)
    found &= users[target] == users
    result = np.zeros(len(order), dtype=np.int64)
    result[order] = np.where(found, items[target], 0)
    return result


def content_vectors(
    item_factors: np.ndarray, content_dim: int = 64, content_strength: float = 0.8, seed: int = 0
) -> np.ndarray:
    """``[num_items + 1, content_dim]`` float32: row i is item id i, row 0 (the unknown id) zeros."""
    rng = _streams(seed)["content"]
    num_items, d = item_factors.shape
    q, _ = np.linalg.qr(rng.standard_normal((content_dim, d)))  # orthonormal columns
    rho = float(content_strength)
    signal = item_factors.astype(np.float64) @ q.T
    vectors = rho * signal + math.sqrt(1 - rho * rho) * rng.standard_normal((num_items, content_dim))
    return np.vstack([np.zeros((1, content_dim)), vectors]).astype(np.float32)


def write_npy(path: Path, array: np.ndarray) -> None:
    """Atomic write: concurrent runs (a sweep) never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class RecsysSyntheticDataModule(TabularDataModule):
    """The synthetic recommender scenario; see the module docstring for the world, signals and files.

    ``tasks``: ``{name: {kind, label}}``; ``label`` (default: the name) is one of ``SIGNALS``. ``seed``
    fixes the data (the run's ``seed`` only the model and batch order). ``content_vectors_path``: where the
    item content vectors are written (null: ``<cache_dir>/item_content-<key>.npy``, key = the parameters
    they depend on); after ``setup()`` it is ``self.content_vectors_path``.
    """

    def __init__(
        self,
        tasks: Mapping | None = None,
        num_users: int = 5000,
        num_items: int = 1000,
        num_interactions: int = 100_000,
        latent_dim: int = 16,
        num_categories: int = 20,
        category_strength: float = 0.5,
        popularity_exponent: float = 1.0,
        activity_sigma: float = 1.0,
        correlation: Mapping[str, float] | None = None,
        feature_effect_std: float = 0.3,
        noise_std: float = 1.0,
        click_rate: float = 0.2,
        like_rate: float = 0.2,
        interest_top_k: int = 3,
        interest_noise: float = 0.5,
        time_span_days: float = 30.0,
        content_dim: int = 64,
        content_strength: float = 0.8,
        content_vectors_path: str | None = None,
        cache_dir: str | None = "~/.cache/mtl-experiments/recsys-synthetic",
        split: str = "random",
        cold_fraction: float = 0.1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
        **kwargs,
    ):
        if tasks is None:
            tasks = {name: {"kind": SIGNALS[name]} for name in DEFAULT_TASKS}
        super().__init__(tasks=tasks, **kwargs)
        for name, task in self.tasks.items():
            if task.label not in SIGNALS:
                raise ConfigError(
                    f"data.tasks.{name}: recsys_synthetic has no signal {task.label!r}; available signals: "
                    f"{list(SIGNALS)} (name the task after one, or set data.tasks.{name}.label=<signal>)."
                )
            allowed = KINDS[SIGNALS[task.label]]
            if task.kind not in allowed:
                raise ConfigError(
                    f"data.tasks.{name}: signal {task.label!r} is {SIGNALS[task.label]}, so the task's kind must be "
                    f"{' or '.join(allowed)}, got {task.kind!r}."
                )
        sizes = {"num_users": num_users, "num_items": num_items, "num_interactions": num_interactions,
                 "latent_dim": latent_dim, "num_categories": num_categories, "content_dim": content_dim}  # fmt: skip
        for key, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r}.")
        if latent_dim < 1 + len(CORRELATED):
            raise ConfigError(
                f"data.latent_dim must be >= {1 + len(CORRELATED)} (one direction for click and one of its own for "
                f"each of {list(CORRELATED)}), got {latent_dim}."
            )
        if content_dim < latent_dim:
            raise ConfigError(
                f"data.content_dim ({content_dim}) must be >= data.latent_dim ({latent_dim}) so the content vectors "
                "can carry the item factors."
            )
        corr = dict(correlation or {})
        unknown = sorted(set(corr) - set(CORRELATED))
        if unknown:
            raise ConfigError(
                f"data.correlation has unknown signal(s) {unknown}; it sets the correlation of {list(CORRELATED)} "
                "with click, e.g. data.correlation.like=0.8."
            )
        for name, p in corr.items():
            if not isinstance(p, (int, float)) or not -1.0 <= float(p) <= 1.0:
                raise ConfigError(f"data.correlation.{name} must lie in [-1, 1] (a correlation with click), got {p!r}.")
        unit = {"category_strength": category_strength, "content_strength": content_strength}
        for key, value in unit.items():
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"data.{key} must lie in [0, 1], got {value}.")
        for key, value in {"click_rate": click_rate, "like_rate": like_rate}.items():
            if not 0.0 < float(value) < 1.0:
                raise ConfigError(f"data.{key} must lie in (0, 1), got {value}.")
        nonneg = {"popularity_exponent": popularity_exponent, "activity_sigma": activity_sigma,
                  "feature_effect_std": feature_effect_std, "noise_std": noise_std,
                  "interest_noise": interest_noise}  # fmt: skip
        for key, value in nonneg.items():
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ConfigError(f"data.{key} must be a finite number >= 0, got {value}.")
        if float(time_span_days) <= 0:
            raise ConfigError(f"data.time_span_days must be > 0, got {time_span_days}.")
        if not 1 <= int(interest_top_k) <= int(num_categories):
            raise ConfigError(
                f"data.interest_top_k must lie in [1, data.num_categories={num_categories}], got {interest_top_k}."
            )
        check_split_options(split, cold_fraction, val_fraction, test_fraction, num_rows=num_interactions)
        self.params = dict(
            num_users=num_users,
            num_items=num_items,
            num_interactions=num_interactions,
            latent_dim=latent_dim,
            num_categories=num_categories,
            category_strength=float(category_strength),
            popularity_exponent=float(popularity_exponent),
            activity_sigma=float(activity_sigma),
            correlation={name: float(corr.get(name, 0.5)) for name in CORRELATED},
            feature_effect_std=float(feature_effect_std),
            noise_std=float(noise_std),
            click_rate=float(click_rate),
            like_rate=float(like_rate),
            interest_top_k=int(interest_top_k),
            interest_noise=float(interest_noise),
            time_span_days=float(time_span_days),
            seed=int(seed),
        )
        self.content = {"content_dim": content_dim, "content_strength": float(content_strength)}
        self.split = split
        self.split_options = {
            "val_fraction": val_fraction,
            "test_fraction": test_fraction,
            "cold_fraction": cold_fraction,
        }
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None
        if content_vectors_path is None and self.cache_dir is None:
            raise ConfigError("Set data.content_vectors_path or data.cache_dir: the item content vectors need a file.")
        self.content_vectors_path = (
            Path(str(content_vectors_path)).expanduser() if content_vectors_path else self._default_content_path()
        )
        self.world: dict | None = None  # users, items and the full log, after setup()

    def _default_content_path(self) -> Path:
        keys = ("num_items", "latent_dim", "num_categories", "category_strength", "seed")
        blob = {"version": CONTENT_VERSION, **{k: self.params[k] for k in keys}, **self.content}
        key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"item_content-{key}.npy"

    @property
    def interactions(self) -> dict[str, np.ndarray]:
        """The whole impression log in time order (after ``setup()``)."""
        return self.world["log"]

    def load(self) -> tuple[Split, Split, Split, FeatureSpec]:
        self.world = world = generate(**self.params)
        users, items, rows = world["users"], world["items"], world["log"]
        vectors = content_vectors(items["factors"], seed=self.params["seed"], **self.content)
        write_npy(self.content_vectors_path, vectors)
        log.info("recsys_synthetic: item content vectors %s written to %s", vectors.shape, self.content_vectors_path)

        u, i = rows["user_id"] - 1, rows["item_id"] - 1
        categorical = np.column_stack(
            [
                rows["user_id"],
                rows["item_id"],
                *(users[f][u] for f in USER_FEATURES),
                *(items[f][i] for f in ITEM_FEATURES),
            ]
        )
        numeric = np.column_stack([users["user_activity"][u], items["item_log_duration"][i]])
        parts = split_rows(
            self.split,
            len(u),
            user_id=rows["user_id"],
            item_id=rows["item_id"],
            timestamp=rows["timestamp"],
            seed=int(_streams(self.params["seed"])["split"].integers(2**63)),  # the split's own stream
            **self.split_options,
        )
        labels = {name: rows[SIGNAL_COLUMN.get(task.label, task.label)] for name, task in self.tasks.items()}
        if self.split == "cold_item":  # a held-out item is not even a training target (see the module docstring)
            held_out = ~np.isin(np.arange(self.params["num_items"] + 1), rows["item_id"][parts["train"]])
            held_out[0] = False
            train_rows = np.zeros(len(u), dtype=bool)
            train_rows[parts["train"]] = True
            for name, task in self.tasks.items():
                if task.kind == "retrieval":
                    labels[name] = np.where(train_rows & held_out[labels[name]], 0, labels[name])
        table = {
            "features": {"categorical": torch.from_numpy(categorical), "numeric": torch.from_numpy(numeric)},
            "labels": {name: torch.from_numpy(values) for name, values in labels.items()},
            "user_id": torch.from_numpy(rows["user_id"]),
            "item_id": torch.from_numpy(rows["item_id"]),
            "timestamp": torch.from_numpy(rows["timestamp"]),
        }
        # split_rows gives sorted rows, so each split stays in time order (the loader shuffles training batches)
        splits = {name: _gather(table, torch.from_numpy(idx)) for name, idx in parts.items()}
        cards = {"user_id": self.params["num_users"], "item_id": self.params["num_items"], **USER_FEATURES,
                 "category": self.params["num_categories"], "price_bucket": PRICE_BUCKETS}  # fmt: skip
        spec = FeatureSpec(
            numeric=NUMERIC,
            categorical={c: cards[c] + 1 for c in CATEGORICAL},  # + the id 0
            id_columns={"user_id": "user_id", "item_id": "item_id"},
        )
        self.item_info = ItemInfo(self.params["num_items"], category=id_table(items["category"]))
        self.catalog = Catalog(
            users={
                "user_id": torch.arange(self.params["num_users"] + 1),
                **{f: id_table(users[f]) for f in (*USER_FEATURES, "user_activity")},
            },
            items={
                "item_id": torch.arange(self.params["num_items"] + 1),
                **{f: id_table(items[f]) for f in (*ITEM_FEATURES, "item_log_duration")},
            },
            spec=spec,
            train_user_id=splits["train"]["user_id"],
            train_item_id=splits["train"]["item_id"],
        )
        return splits["train"], splits["val"], splits["test"], spec


def id_table(values: np.ndarray) -> torch.Tensor:
    """A per-user (or per-item) array indexed by id - 1 -> a tensor indexed by id, row 0 (the unknown id) zero."""
    return torch.from_numpy(np.concatenate([np.zeros(1, values.dtype), values]))
