"""The keys of one ``data`` / ``backbone`` / ``loss`` option only: what ``conf/<group>/<option>.yaml`` has beyond the
keys every option of its group shares (``schema.SHARED``). ``tests/test_schema.py`` enrols every key of every option,
so a new key needs its rule here or in ``SHARED``. The option's constructor checks the value again (same words) once
torch is loaded; these rules answer first, in about a second, before any run exists."""

from __future__ import annotations

from mtl_experiments import checks
from mtl_experiments.data.splits import SPLIT_MODES
from mtl_experiments.schema_rules import (
    COUNT,
    EMA,
    FRACTION,
    MAYBE_TEXT,
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    TEXT,
    Check,
    any_of,
    checks_ok,
    mapping_of,
    nullable,
    one_of,
    rule,
    texts,
)

OPTIONS: dict[str, dict[str, dict[str, Check]]] = {
    "data": {
        "census_income": {
            "task_group": one_of(1, 2, hint="1: income and marital status, 2: education and marital status"),
            "college_levels": texts,
            "download_url": TEXT,
            "download_sha256": nullable(rule(checks.mapping, hint="{<file name>: <sha256>}")),
        },
        "kuairand": {
            "logs": any_of(
                "'standard', 'random', 'all' or a list of log file patterns",
                None,
                lambda v: v in ("standard", "random", "all"),
                lambda v: checks_ok(texts, v) and len(v) > 0,
            ),
            "user_features": TEXT,
            "video_features": MAYBE_TEXT,
            "item_catalog": one_of("logs", "features"),
            "context_features": rule(checks.boolean),
            "next_item_signal": nullable(
                one_of("click", "like", "follow", "comment", "forward", "hate", "long_view", "profile_enter")
            ),
        },
        "movielens": {
            "like_threshold": rule(checks.number, low=1, high=5, hint="stars"),
            "interest_top_k": COUNT,
            "encoding": TEXT,
        },
        "recsys_synthetic": {
            **dict.fromkeys(("category_strength", "content_strength"), FRACTION),
            **dict.fromkeys(("click_rate", "like_rate"), OPEN_FRACTION),
            **dict.fromkeys(("popularity_exponent", "activity_sigma", "interest_noise"), NON_NEGATIVE),
            "interest_top_k": COUNT,
            "time_span_days": POSITIVE,
        },
        "stream": {
            "row_id_column": MAYBE_TEXT,
            "hash_buckets": mapping_of(COUNT),
            "split": one_of(*SPLIT_MODES, "shards", hint="shards: data.val_shards and data.test_shards"),
            "val_shards": texts,
            "test_shards": texts,
            "shuffle_buffer": rule(checks.non_negative_int),
            "on_bad_shard": one_of("stop", "skip"),
            "auroc_bins": nullable(rule(checks.integer, low=2, hint="score bins of [0, 1], e.g. 10000")),
        },
        "synthetic": {"scale": POSITIVE},
    },
    "backbone": {"cross_stitch": {"alpha_self": FRACTION}, "esmm": {"ctr_task": TEXT, "ctcvr_task": TEXT}},
    "loss": {
        "aligned_mtl": {"aggregator": rule(checks.mapping)},
        "cagrad": {"c": NON_NEGATIVE, "rescale": one_of(0, 1, 2)},
        "db_mtl": {"beta": EMA, "beta_sigma": NON_NEGATIVE},
        "dwa": {"temperature": rule(checks.positive_number, hint="the softmax temperature T; the paper uses 2")},
        "excess_mtl": {"robust_step_size": POSITIVE, "warmup_steps": COUNT},
        "fairgrad": {"alpha": POSITIVE, "tol": POSITIVE, "tol_residual": POSITIVE},
        "famo": {"gamma": NON_NEGATIVE, "optimizer": one_of("adam", "sgd")},
        "graddrop": {"leak": nullable(mapping_of(FRACTION))},
        "gradnorm": {
            "alpha": NON_NEGATIVE,
            "optimizer": rule(checks.mapping),
            "initial_loss_steps": COUNT,
            "layer": MAYBE_TEXT,
        },
        "gradvac": {"beta": FRACTION, "granularity": one_of("whole_model", "all_matrix")},
        "metabalance": {
            "relax_factor": FRACTION,
            "beta": EMA,
            "strategy": one_of("both", "reduce", "enlarge"),
            "granularity": one_of("all_matrix", "whole_model"),
            "target_task": MAYBE_TEXT,
        },
        "mgda": {"epsilon": rule(checks.fraction, open_high=True)},
        "moco": {
            "beta": rule(checks.fraction, open_low=True),
            **dict.fromkeys(("beta_sigma", "gamma_sigma", "rho"), NON_NEGATIVE),
            "gamma": POSITIVE,
        },
        "nash_mtl": {"max_norm": NON_NEGATIVE, "update_weights_every": COUNT},
        "pcgrad": {"aggregator": rule(checks.mapping)},
        "rlw": {"scale": one_of("sum_to_one", "num_tasks")},
        "sdmgrad": {"lamda": NON_NEGATIVE, "momentum": EMA, "iterations": COUNT},
        "stch": {"mu": POSITIVE, "warmup_epochs": COUNT, "reference": one_of("warmup", "running_min")},
        "uncertainty": {"init_log_var": rule(checks.number), "positive_regularizer": rule(checks.boolean)},
    },
}
