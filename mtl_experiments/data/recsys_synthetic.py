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
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from mtl_experiments import checks
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.data.catalog import Catalog
from mtl_experiments.data.interactions import log_splits, next_positive_item
from mtl_experiments.data.spec import FeatureSpec, ItemInfo, LabelType, Splits
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


@dataclass(frozen=True)
class WorldConfig:
    """The generator's settings (the module docstring's symbols), each a ``data.<field>`` key of
    conf/data/recsys_synthetic.yaml; checked and converted once, here."""

    num_users: int = 5000
    num_items: int = 1000
    num_interactions: int = 100_000
    latent_dim: int = 16
    num_categories: int = 20
    category_strength: float = 0.5
    popularity_exponent: float = 1.0
    activity_sigma: float = 1.0
    correlation: Mapping[str, float] = field(default_factory=dict)  # missing signals: 0.5
    feature_effect_std: float = 0.3
    noise_std: float = 1.0
    click_rate: float = 0.2
    like_rate: float = 0.2
    interest_top_k: int = 3
    interest_noise: float = 0.5
    time_span_days: float = 30.0
    content_dim: int = 64
    content_strength: float = 0.8
    seed: int = 0

    def __post_init__(self):
        for key, value in self._checked().items():
            object.__setattr__(self, key, value)

    def _checked(self) -> dict:
        """Every field checked (``checks``), as int / float / a full correlation dict."""
        out = {k: checks.positive_int(f"data.{k}", getattr(self, k)) for k in ("num_users", "num_items",
               "num_interactions", "num_categories")}  # fmt: skip
        out["latent_dim"] = checks.integer(
            "data.latent_dim", self.latent_dim, low=1 + len(CORRELATED),
            hint=f"one direction for click and one of its own for each of {list(CORRELATED)}",
        )  # fmt: skip
        out["content_dim"] = checks.positive_int("data.content_dim", self.content_dim)
        if out["content_dim"] < out["latent_dim"]:
            raise ConfigError(
                f"data.content_dim ({self.content_dim}) must be >= data.latent_dim ({self.latent_dim}) so the content "
                "vectors can carry the item factors."
            )
        corr = dict(self.correlation or {})
        unknown = sorted(set(corr) - set(CORRELATED))
        if unknown:
            raise ConfigError(
                f"data.correlation has unknown signal(s) {unknown}; it sets the correlation of {list(CORRELATED)} "
                "with click, e.g. data.correlation.like=0.8."
            )
        out["correlation"] = {
            name: checks.number(f"data.correlation.{name}", corr.get(name, 0.5), low=-1, high=1,
                                hint="a correlation with click")
            for name in CORRELATED
        }  # fmt: skip
        for key in ("category_strength", "content_strength"):
            out[key] = checks.fraction(f"data.{key}", getattr(self, key))
        for key in ("click_rate", "like_rate"):
            out[key] = checks.fraction(f"data.{key}", getattr(self, key), open_low=True, open_high=True)
        for key in ("popularity_exponent", "activity_sigma", "feature_effect_std", "noise_std", "interest_noise"):
            out[key] = checks.non_negative_number(f"data.{key}", getattr(self, key))
        out["time_span_days"] = checks.positive_number("data.time_span_days", self.time_span_days)
        out["interest_top_k"] = checks.integer(
            "data.interest_top_k", self.interest_top_k, low=1, high=out["num_categories"],
            hint="at most data.num_categories",
        )  # fmt: skip
        out["seed"] = checks.non_negative_int("data.seed", self.seed)
        return out


WORLD_KEYS = tuple(f.name for f in fields(WorldConfig))


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


def generate(config: WorldConfig) -> dict:
    """The world and its log as numpy arrays (see the module docstring); ids are 1-based.

    Returns ``{"users": {...}, "items": {...}, "log": {...}}``: per-user arrays indexed by user id - 1,
    per-item arrays by item id - 1, and the log's columns (one row per impression, in time order).
    """
    rng = _streams(config.seed)
    users, log_activity = _users(config, rng["users"])
    items, category, popularity = _items(config, rng["items"])
    users["interested_categories"] = _interests(config, users["factors"], items["centroids"], rng["noise"])
    user_idx, item_idx, timestamp = _impressions(config, log_activity, popularity, rng["log"])
    utility = _utility(config, users, items, user_idx, item_idx, rng)
    return {"users": users, "items": items, "log": _signals(config, users, items, user_idx, item_idx, timestamp,
                                                            utility, category)}  # fmt: skip


def generate_windows(config: WorldConfig, windows: int) -> Iterator[tuple[int, dict, dict, dict[str, np.ndarray]]]:
    """The same world's log in ``windows`` consecutive time windows of ``num_interactions // windows`` rows each
    (the first ``num_interactions % windows`` windows one more), yielded last window first as ``(k, users, items,
    log)`` (``generate``'s three parts): one window's rows in memory at a time (scripts/make_log.py). The users,
    items and feature effects are ``generate``'s; window k draws its impressions and noise from its own streams
    (``windows=1``: ``generate``'s log exactly). The click / like thresholds are each window's quantiles;
    ``next_item_id`` links a user's last rows of a window to the first click of a later window (hence last window
    first).
    """
    rng = _streams(config.seed)
    users, log_activity = _users(config, rng["users"])
    items, category, popularity = _items(config, rng["items"])
    users["interested_categories"] = _interests(config, users["factors"], items["centroids"], rng["noise"])
    span = max(1, int(config.time_span_days * 86400) // windows)  # seconds per window
    size, extra = divmod(config.num_interactions, windows)
    next_click = np.zeros(config.num_users + 1, np.int64)  # user id -> item of their first click after this window
    for k in reversed(range(windows)):
        rows = size + (k < extra)
        c = config if windows == 1 else replace(config, num_interactions=rows, time_span_days=span / 86400)
        streams = rng  # one window: generate's streams, where they are
        if windows > 1:  # the effects stream from its start (the world's feature effects); log and noise the window's
            streams = {**_streams(config.seed), "log": np.random.default_rng([config.seed, k, 0]),
                       "noise": np.random.default_rng([config.seed, k, 1])}  # fmt: skip
        user_idx, item_idx, timestamp = _impressions(c, log_activity, popularity, streams["log"])
        utility = _utility(c, users, items, user_idx, item_idx, streams)
        log_k = _signals(c, users, items, user_idx, item_idx, timestamp + k * span, utility, category)
        nxt, user = log_k["next_item_id"], log_k["user_id"]
        log_k["next_item_id"] = np.where(nxt == 0, next_click[user], nxt)
        first = np.flatnonzero(log_k["click"] > 0)[::-1]  # reversed: the earliest click of each user written last
        next_click[user[first]] = log_k["item_id"][first]
        yield k, users, items, log_k


def _users(c: WorldConfig, r: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """User factors u, their side features and log-activity (the ``users`` stream)."""
    d = c.latent_dim
    u = r.standard_normal((c.num_users, d), dtype=np.float32)
    log_activity = c.activity_sigma * r.standard_normal(c.num_users)
    users = {
        "factors": u,
        "age_bucket": _buckets(u @ _unit(r, d) + 0.5 * r.standard_normal(c.num_users), USER_FEATURES["age_bucket"]),
        "region": np.argmax(
            u @ r.standard_normal((d, USER_FEATURES["region"])) / math.sqrt(d)
            + r.gumbel(size=(c.num_users, USER_FEATURES["region"])),
            axis=1,
        ).astype(np.int64)
        + 1,
        "activity_level": _buckets(log_activity, USER_FEATURES["activity_level"]),
        "user_activity": (log_activity / c.activity_sigma if c.activity_sigma > 0 else log_activity).astype(np.float32),
    }
    return users, log_activity


def _items(c: WorldConfig, r: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Item factors v (around their category centroid), side features, durations and Zipf popularity (the
    ``items`` stream); also the 0-based categories and the unnormalised popularity."""
    d, n = c.latent_dim, c.num_items
    centroids = r.standard_normal((c.num_categories, d), dtype=np.float32)
    category = r.integers(0, c.num_categories, n)
    s = c.category_strength
    v = (math.sqrt(s) * centroids[category] + math.sqrt(1 - s) * r.standard_normal((n, d))).astype(np.float32)
    log_duration_std = 0.6 * (v @ _unit(r, d)) + 0.8 * r.standard_normal(n)  # unit variance
    ranking = r.permutation(n)  # ranking[k] = index of the (k+1)-th most popular item
    popularity = np.empty(n)
    popularity[ranking] = (np.arange(n) + 1.0) ** -c.popularity_exponent
    items = {
        "factors": v,
        "centroids": centroids,
        "category": category.astype(np.int64) + 1,
        "price_bucket": _buckets(v @ _unit(r, d) + 0.5 * r.standard_normal(n), PRICE_BUCKETS),
        "item_log_duration": log_duration_std.astype(np.float32),
        "duration_seconds": (120.0 * np.exp(0.8 * log_duration_std)).astype(np.float32),
        "popularity": (popularity / popularity.sum()).astype(np.float32),
    }
    return items, category, popularity


def _interests(c: WorldConfig, u: np.ndarray, centroids: np.ndarray, noise: np.random.Generator) -> np.ndarray:
    """The user x category interest table: one noisy affinity per pair, the top-k categories per user."""
    affinity = u @ centroids.T / math.sqrt(c.latent_dim) + c.interest_noise * noise.standard_normal(
        (c.num_users, c.num_categories), dtype=np.float32
    )
    top = np.argpartition(-affinity, c.interest_top_k - 1, axis=1)[:, : c.interest_top_k]
    interested = np.zeros((c.num_users, c.num_categories), dtype=bool)
    np.put_along_axis(interested, top, True, axis=1)
    return interested


def _impressions(
    c: WorldConfig, log_activity: np.ndarray, popularity: np.ndarray, r: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Who sees what when (the ``log`` stream): user ∝ activity, item ∝ popularity, sorted timestamps."""
    n = c.num_interactions
    activity = np.exp(log_activity - log_activity.max())  # shifted: no overflow for a large activity_sigma
    user_idx = r.choice(c.num_users, size=n, p=activity / activity.sum())
    item_idx = r.choice(c.num_items, size=n, p=popularity / popularity.sum())
    timestamp = np.sort(r.integers(0, max(1, int(c.time_span_days * 86400)), n))
    return user_idx, item_idx, timestamp


def _utility(c: WorldConfig, users: dict, items: dict, user_idx: np.ndarray, item_idx: np.ndarray, rng: dict):
    """``y[N, 3]``: the utilities of click, like, watch_time (latent match + feature effects + noise)."""
    r, n = rng["effects"], len(user_idx)
    w = signal_directions(c.latent_dim, c.correlation, r).astype(np.float32)
    sides = [  # (ids 1..n per user or item, n, the row's user or item index)
        *((users[f], n_values, user_idx) for f, n_values in USER_FEATURES.items()),
        (items["category"], c.num_categories, item_idx),
        (items["price_bucket"], PRICE_BUCKETS, item_idx),
    ]
    u, v = users["factors"], items["factors"]
    utility = np.empty((n, w.shape[1]), dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        utility[lo:hi] = (u[user_idx[lo:hi]] * v[item_idx[lo:hi]]) @ w
    for values, n_values, index in sides:
        effects = r.normal(0.0, c.feature_effect_std, (w.shape[1], n_values + 1)).astype(np.float32)
        utility += effects[:, values[index]].T
    utility += c.noise_std * rng["noise"].standard_normal((n, w.shape[1]), dtype=np.float32)
    return utility


def _signals(c: WorldConfig, users, items, user_idx, item_idx, timestamp, utility, category) -> dict[str, np.ndarray]:
    """The log's columns: ids, timestamp and every signal (see the module docstring)."""
    click = utility[:, 0] > np.quantile(utility[:, 0], 1 - c.click_rate)
    like = click & (utility[:, 1] > np.quantile(utility[:, 1], 1 - c.like_rate))
    watched_share = 0.5 * (1 + np.tanh(utility[:, 2] / 2))  # sigmoid(y_watch), without exp overflow warnings
    seconds = np.where(click, items["duration_seconds"][item_idx] * watched_share, 0.0)
    interest = users["interested_categories"][user_idx, category[item_idx]]
    user_id, item_id = user_idx.astype(np.int64) + 1, item_idx.astype(np.int64) + 1
    return {
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


def content_vectors(item_factors: np.ndarray, config: WorldConfig) -> np.ndarray:
    """``[num_items + 1, content_dim]`` float32: row i is item id i, row 0 (the unknown id) zeros."""
    rng = _streams(config.seed)["content"]
    num_items, d = item_factors.shape
    q, _ = np.linalg.qr(rng.standard_normal((config.content_dim, d)))  # orthonormal columns
    rho = config.content_strength
    signal = item_factors.astype(np.float64) @ q.T
    vectors = rho * signal + math.sqrt(1 - rho * rho) * rng.standard_normal((num_items, config.content_dim))
    return np.vstack([np.zeros((1, config.content_dim)), vectors]).astype(np.float32)


def write_npy(path: Path, array: np.ndarray) -> None:
    """Atomic write: concurrent runs (a sweep) never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


class RecsysSyntheticDataModule(TabularDataModule):
    """The synthetic recommender scenario; see the module docstring for the world, signals and files.

    ``tasks``: ``{name: {kind, label}}``; ``label`` (default: the name) is one of ``SIGNALS``. The generator's
    settings (``num_users``, ``latent_dim``, ``correlation``, ..., ``seed``: ``WorldConfig``'s fields) become
    ``self.config``; ``seed`` fixes the data (the run's ``seed`` only the model and batch order).
    ``content_vectors_path``: where the item content vectors are written (null: ``<cache_dir>/item_content-<key>.npy``,
    key = the settings they depend on); after ``setup()`` it is ``self.content_vectors_path``.
    """

    def __init__(
        self,
        tasks: Mapping | None = None,
        content_vectors_path: str | None = None,
        cache_dir: str | None = "~/.cache/mtl-experiments/recsys-synthetic",
        split: str = "random",
        cold_fraction: float = 0.1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        **kwargs,
    ):
        world = {k: kwargs.pop(k) for k in WORLD_KEYS if k in kwargs}
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
        self.config = WorldConfig(**world)
        check_split_options(split, cold_fraction, val_fraction, test_fraction, num_rows=self.config.num_interactions)
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
        keys = ("num_items", "latent_dim", "num_categories", "category_strength", "seed", "content_dim",
                "content_strength")  # fmt: skip
        settings = asdict(self.config)
        blob = {"version": CONTENT_VERSION, **{k: settings[k] for k in keys}}
        key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
        return self.cache_dir / f"item_content-{key}.npy"

    @property
    def interactions(self) -> dict[str, np.ndarray]:
        """The whole impression log in time order (after ``setup()``)."""
        return self.world["log"]

    def load(self) -> Splits:
        self.world = world = generate(self.config)
        users, items, rows = world["users"], world["items"], world["log"]
        vectors = content_vectors(items["factors"], self.config)
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
            seed=int(_streams(self.config.seed)["split"].integers(2**63)),  # the split's own stream
            **self.split_options,
        )
        labels = self._labels(rows, parts["train"])
        # split_rows gives sorted rows, so each split stays in time order (the loader shuffles training batches)
        splits = log_splits(
            torch.from_numpy(categorical),
            torch.from_numpy(numeric),
            labels,
            {k: torch.from_numpy(rows[k]) for k in ("user_id", "item_id", "timestamp")},
            {name: torch.from_numpy(idx) for name, idx in parts.items()},
        )
        spec = self._catalogue(users, items, splits["train"])
        return Splits(splits["train"], splits["val"], splits["test"], spec)

    def _labels(self, rows: Mapping[str, np.ndarray], train: np.ndarray) -> dict[str, torch.Tensor]:
        """Each task's signal; under ``cold_item`` an item label naming a held-out item is 0 on training rows (see
        the module docstring)."""
        labels = {name: rows[SIGNAL_COLUMN.get(task.label, task.label)] for name, task in self.tasks.items()}
        if self.split == "cold_item":
            held_out = ~np.isin(np.arange(self.config.num_items + 1), rows["item_id"][train])
            held_out[0] = False
            train_rows = np.zeros(len(rows["user_id"]), dtype=bool)
            train_rows[train] = True
            for name, task in self.tasks.items():
                if task.label_type is LabelType.ITEM:
                    labels[name] = np.where(train_rows & held_out[labels[name]], 0, labels[name])
        return {name: self.tasks[name].encode_labels(values) for name, values in labels.items()}

    def _catalogue(self, users: Mapping, items: Mapping, train) -> FeatureSpec:
        """The feature spec; sets ``item_info`` and the serving ``catalog`` (user and item tables by id)."""
        c = self.config
        cards = {"user_id": c.num_users, "item_id": c.num_items, **USER_FEATURES, "category": c.num_categories,
                 "price_bucket": PRICE_BUCKETS}  # fmt: skip
        spec = FeatureSpec(
            numeric=NUMERIC,
            categorical={col: cards[col] + 1 for col in CATEGORICAL},  # + the id 0
            id_columns={"user_id": "user_id", "item_id": "item_id"},
        )
        self.item_info = ItemInfo(c.num_items, category=id_table(items["category"]))
        self.catalog = Catalog(
            users={"user_id": torch.arange(c.num_users + 1), **{f: id_table(users[f]) for f in (*USER_FEATURES,
                   "user_activity")}},
            items={"item_id": torch.arange(c.num_items + 1), **{f: id_table(items[f]) for f in (*ITEM_FEATURES,
                   "item_log_duration")}},
            spec=spec,
            train_user_id=train["user_id"],
            train_item_id=train["item_id"],
        )  # fmt: skip
        return spec


def id_table(values: np.ndarray) -> torch.Tensor:
    """A per-user (or per-item) array indexed by id - 1 -> a tensor indexed by id, row 0 (the unknown id) zero."""
    return torch.from_numpy(np.concatenate([np.zeros(1, values.dtype), values]))
