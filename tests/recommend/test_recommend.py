"""mtl-recommend (mtl_experiments/recommend/): a tiny recsys_synthetic run, trained for real into a SQLite store,
served to known and new users through the Python API and, once, through the CLI in a subprocess."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient

from mtl_experiments import recommend as rec
from mtl_experiments import safe_config, tracking
from mtl_experiments.data.spec import gather
from mtl_experiments.errors import ConfigError
from mtl_experiments.pipeline import hydra_context, train
from mtl_experiments.tasks import build_tasks
from tests.conftest import RECSYS_TINY, ROOT, TINY, compose_cfg, free_port, fresh_store

BINARY = ("click", "like", "interest")


def _train(root: Path, overrides: list[str], empty_store: Path) -> str:
    uri = fresh_store(empty_store, root / "mlflow.db")
    cfg = compose_cfg([f"logger.mlflow.tracking_uri={uri}", *overrides], root / "out")
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.info.run_id


@pytest.fixture(scope="module")
def trained(tmp_path_factory, empty_store):
    """click, like, watch_time, interest and a next_item retrieval task, 2 epochs; served from its run id."""
    root = tmp_path_factory.mktemp("recommend")
    overrides = [
        "data=recsys_synthetic",
        *RECSYS_TINY,
        f"data.cache_dir={root / 'cache'}",
        "+data.tasks.next_item={kind: retrieval}",
        "trainer.max_epochs=2",
        "trainer.enable_model_summary=false",
        "~callbacks.progress_bar",
    ]
    run_id = _train(root, overrides, empty_store)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    served = rec.load_run(run_id, uri)
    train_split = served.datamodule.splits["train"]
    users, counts = torch.unique(train_split["user_id"], return_counts=True)
    return SimpleNamespace(
        root=root,
        uri=uri,
        run_id=run_id,
        served=served,
        user=int(users[counts.argmax()]),
        split=train_split,
        overrides=overrides,
    )


def run_rec(t, user, k=None, **kwargs):
    s = t.served
    return rec.recommend(s.model, s.catalog, s.tasks, user, k or s.catalog.num_items, **kwargs)


@torch.inference_mode()
def forward(model, features):
    return model(features)


def user_features(catalog, user_id: int) -> dict[str, str]:
    """A user's stored feature values, as the strings --user-features takes."""
    return {c: str(catalog.users[c][user_id].item()) for c in catalog.user_columns}


# ---------------------------------------------------------------------------------------------- known users


def test_run_id_serves_the_best_checkpoint(trained):
    assert Path(trained.served.checkpoint).name.startswith("best-epoch")
    assert trained.served.notes == []


def test_known_user_is_ranked_by_the_product_of_binary_probabilities(trained):
    rows = run_rec(trained, trained.user)
    num_items = trained.served.catalog.num_items
    assert [r["rank"] for r in rows] == list(range(1, num_items + 1))
    assert sorted(r["item_id"] for r in rows) == list(range(1, num_items + 1))
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    for r in rows:
        assert r["score"] == pytest.approx(sum(math.log(r["tasks"][t]) for t in BINARY), rel=1e-9, abs=1e-9)
    assert run_rec(trained, trained.user, k=5) == rows[:5]


def test_scores_equal_a_direct_forward_on_the_users_training_rows(trained):
    """The catalogue assembles the same inputs the dataset trained on: a forward on the user's own training rows
    gives the same per-task scores as the recommendation rows for those items."""
    s, split = trained.served, trained.split
    rows = {r["item_id"]: r["tasks"] for r in run_rec(trained, trained.user)}
    mine = torch.nonzero(split["user_id"] == trained.user).squeeze(1)
    out = forward(s.model, gather(split["features"], mine))
    for j, item in enumerate(split["item_id"][mine].tolist()):
        for name in BINARY:
            assert rows[item][name] == pytest.approx(float(torch.sigmoid(out[name][j].double())), abs=1e-6)
        assert rows[item]["watch_time"] == pytest.approx(float(out["watch_time"][j]), abs=1e-5)


def test_retrieval_scores_are_a_softmax_over_the_catalogue_and_enter_fusion_when_weighted(trained):
    s = trained.served
    rows = run_rec(trained, trained.user)
    assert sum(r["tasks"]["next_item"] for r in rows) == pytest.approx(1.0, abs=1e-9)
    # one query per user: its row with the item unknown
    with torch.inference_mode():
        query = s.model(s.catalog.features(trained.user, torch.zeros(1, dtype=torch.long)))["next_item"]
        expected = torch.softmax(s.tasks["next_item"].predict(query)[0].double(), 0)
    for r in rows[:10]:
        assert r["tasks"]["next_item"] == pytest.approx(float(expected[r["item_id"] - 1]), rel=1e-6)
    weighted = run_rec(trained, trained.user, weights={"click": 2, "next_item": 1})
    for r in weighted:
        want = 2 * math.log(r["tasks"]["click"]) + math.log(r["tasks"]["next_item"])
        assert r["score"] == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert [r["item_id"] for r in weighted] != [r["item_id"] for r in rows]  # the weights change the ranking


def test_retrieval_only_scoring_runs_one_forward_not_one_per_item_batch(trained):
    s = trained.served
    items = torch.arange(1, s.catalog.num_items + 1)
    calls = []
    hook = s.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        only = rec.score_items(s.model, s.catalog, {"next_item": s.tasks["next_item"]}, trained.user, items, None, 7)
    finally:
        hook.remove()
    assert len(calls) == 1  # the query row only: no pointwise task needs the per-item forwards
    full = rec.score_items(s.model, s.catalog, s.tasks, trained.user, items, None, 7)
    assert torch.equal(only["next_item"], full["next_item"])


def test_sum_fusion_weights_values_as_they_are(trained):
    weights = {"click": 1.0, "watch_time": 0.5, "like": -1.0}
    rows = run_rec(trained, trained.user, fusion="sum", weights=weights)
    for r in rows:
        assert r["score"] == pytest.approx(sum(w * r["tasks"][t] for t, w in weights.items()), abs=1e-9)
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)
    default = rec.fusion_weights(trained.served.tasks, "sum")
    assert default == {"click": 1, "like": 1, "watch_time": 1, "interest": 1, "next_item": 0}


def test_exclude_seen_drops_the_users_training_items_only(trained):
    catalog = trained.served.catalog
    seen = set(catalog.seen_items(trained.user).tolist())
    assert seen == set(trained.split["item_id"][trained.split["user_id"] == trained.user].tolist()) and seen
    full = run_rec(trained, trained.user)
    kept = run_rec(trained, trained.user, exclude_seen=True)  # k = the catalogue: fewer rows are left
    assert len(kept) == catalog.num_items - len(seen)
    assert not seen & {r["item_id"] for r in kept}
    assert [r["item_id"] for r in kept] == [r["item_id"] for r in full if r["item_id"] not in seen]


# ----------------------------------------------------------------------------------------------- new users


def test_new_user_is_scored_from_its_features_with_the_new_user_representation(trained):
    s = trained.served
    new_id = s.catalog.num_users + 7
    assert not s.catalog.knows_user(new_id)
    like_known = user_features(s.catalog, trained.user)
    rows = run_rec(trained, new_id, user_features=like_known)
    assert all(r["user_id"] == new_id for r in rows)
    # the same as a forward on the known user's rows with the user id replaced by 0 (unknown)
    items = torch.tensor([r["item_id"] for r in rows])
    features = s.catalog.features(trained.user, items)
    id_col = list(s.catalog.spec.categorical).index(s.catalog.spec.id_columns["user_id"])
    assert (features["categorical"][:, id_col] == trained.user).all()
    features["categorical"][:, id_col] = 0
    out = forward(s.model, features)
    click = torch.sigmoid(out["click"].squeeze(-1).double())
    assert [r["tasks"]["click"] for r in rows] == pytest.approx(click.tolist(), abs=1e-6)
    # the trained id embedding matters for the known user; other features change the new user's scores
    known = {r["item_id"]: r["tasks"]["click"] for r in run_rec(trained, trained.user)}
    assert any(abs(known[r["item_id"]] - r["tasks"]["click"]) > 1e-4 for r in rows)
    cards = s.catalog.spec.categorical
    other = {c: str(int(v) % (cards[c] - 1) + 1) for c, v in like_known.items() if c in cards}  # another valid id
    other["user_activity"] = str(float(like_known["user_activity"]) + 2.0)
    assert set(other) == set(like_known) and all(other[c] != like_known[c] for c in other)
    rows_other = {r["item_id"]: r["tasks"]["click"] for r in run_rec(trained, new_id, user_features=other)}
    assert any(abs(rows_other[r["item_id"]] - r["tasks"]["click"]) > 1e-4 for r in rows)


def test_multiclass_tasks_show_their_class_and_never_fuse():
    tasks = build_tasks({"click": {"kind": "binary"}, "rating": {"kind": "multiclass", "num_classes": 5, "top_k": 2}})
    output = torch.tensor([[0.1, 2.0, -1.0, 0.0, 0.3], [3.0, 0.0, 0.0, 0.0, 4.0]])
    assert tasks["rating"].item_scores(output).tolist() == [1, 4]
    assert rec.fusion_weights(tasks, "sum") == {"click": 1, "rating": 0}
    with pytest.raises(ConfigError, match="'rating' \\(multiclass\\) cannot enter sum fusion"):
        rec.fusion_weights(tasks, "sum", {"click": 1, "rating": 1})


# ------------------------------------------------------------------------------------------- errors (API)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, r"k must be an integer in \[1, 100\], got 0 \(1 to the catalogue size, 100\)"),
        ({"k": 101}, r"k must be an integer in \[1, 100\], got 101 \(1 to the catalogue size, 100\)"),
        ({"user_id": 10_000}, "User 10000 is unknown to this dataset .* --user-features age_bucket=...,region="),
        ({"user_id": 0}, "User 0 is unknown"),
        ({"weights": {"clicks": 1}}, r"unknown task\(s\) \['clicks'\]; this model's tasks are \['click'"),
        ({"weights": {"watch_time": 1}}, "'watch_time' \\(regression\\) cannot enter product fusion .* --fusion sum"),
        ({"weights": {"click": 0}}, "Nothing to rank by"),
        ({"weights": {"click": float("nan")}}, "weights.click must be a finite number, got nan"),
        ({"fusion": "max"}, r"fusion must be one of \['product', 'sum'\], got 'max'"),
        ({"user_id": 10_000, "user_features": {"region": "1"}}, r"needs every user feature; missing \['age_bucket'"),
        ({"user_id": 10_000, "user_features": {"height": "1"}}, r"Unknown user feature\(s\) \['height'\]"),
    ],
)
def test_bad_requests_raise_one_clear_config_error(trained, kwargs, message):
    s = trained.served
    kwargs = {"user_id": trained.user, "k": 10, **kwargs}
    with pytest.raises(ConfigError, match=message):
        rec.recommend(s.model, s.catalog, s.tasks, **kwargs)


def test_out_of_range_feature_value_of_a_new_user(trained):
    features = {**user_features(trained.served.catalog, trained.user), "region": "99"}
    with pytest.raises(ConfigError, match=r"region=99 is out of range \[0, 9\)"):
        run_rec(trained, 10_000, user_features=features)


# --------------------------------------------------------------------------------------------------- CLI


def test_cli_known_and_new_user_as_json(trained):
    """The one subprocess: the console script's module, end to end, agrees with the Python API."""
    features = user_features(trained.served.catalog, trained.user)
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "recommend.py"),
        *("--run-id", trained.run_id, "--tracking-uri", trained.uri, "--users", f"{trained.user},5000"),
        *("--user-features", ",".join(f"{k}={v}" for k, v in features.items())),
        *("--k", "5", "--exclude-seen", "--format", "json"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert Path(out["checkpoint"]).name.startswith("best-epoch")
    assert out["fusion"] == "product" and out["weights"]["click"] == 1 and out["weights"]["watch_time"] == 0
    known, new = out["users"]
    assert (known["user_id"], known["new_user"]) == (trained.user, False)
    assert known["excluded"] == len(trained.served.catalog.seen_items(trained.user))
    assert (new["user_id"], new["new_user"], new["excluded"]) == (5000, True, 0)
    for block, kwargs in ((known, {"exclude_seen": True}), (new, {"user_features": features})):
        api = run_rec(trained, block["user_id"], k=5, **kwargs)
        assert [r["item_id"] for r in block["items"]] == [r["item_id"] for r in api]
        assert [r["score"] for r in block["items"]] == pytest.approx([r["score"] for r in api], rel=1e-6)


def test_cli_table(trained, capsys):
    args = ["--run-id", trained.run_id, "--tracking-uri", trained.uri, "--users", str(trained.user), "--k", "3"]
    assert rec.main([*args, "--fusion", "sum", "--weights", "click=1,watch_time=0.5"]) == 0
    out = capsys.readouterr().out
    assert "sum fusion, weights click=1, watch_time=0.5" in out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("rank"))
    assert header.split() == ["rank", "item_id", "score", "click", "like", "watch_time", "interest", "next_item"]
    top = run_rec(trained, trained.user, k=3, fusion="sum", weights={"click": 1, "watch_time": 0.5})
    lines = out.splitlines()
    start = lines.index(header) + 1
    assert [int(line.split()[1]) for line in lines[start : start + 3]] == [r["item_id"] for r in top]


def _cli_error(capsys, argv) -> str:
    assert rec.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") or "\nError: " in err
    return err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--users", "10000"], "User 10000 is unknown to this dataset"),
        (["--users", "1", "--k", "0"], r"--k must be an integer in \[1, 100\], got 0"),
        (["--users", "1", "--weights", "click=2,nope=1"], r"unknown task\(s\) \['nope'\]"),
        (["--users", "1", "--weights", "click=high"], "--weights click='high' is not a number"),
        (["--users", "1,x"], "--users takes user ids separated by commas"),
        (["--users", "10000", "--user-features", "region"], "--user-features takes key=value pairs"),
    ],
)
def test_cli_bad_input_exits_2(trained, capsys, extra, message):
    err = _cli_error(capsys, ["--run-id", trained.run_id, "--tracking-uri", trained.uri, *extra])
    assert re.search(message, err), err


# ------------------------------------------------------------------------------ finding a run's checkpoint


def test_unknown_run_and_unreachable_stores(trained, tmp_path, capsys):
    missing = "0" * 32
    err = _cli_error(capsys, ["--run-id", missing, "--tracking-uri", trained.uri, "--users", "1"])
    assert f"No run {missing} in the MLflow store" in err
    err = _cli_error(capsys, ["--run-id", missing, "--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--users", "1"])
    assert "No MLflow store at" in err and not (tmp_path / "none.db").exists()
    uri = f"http://127.0.0.1:{free_port()}"
    err = _cli_error(capsys, ["--run-id", missing, "--tracking-uri", uri, "--users", "1"])
    assert "cannot be reached" in err
    err = _cli_error(capsys, ["--checkpoint", str(tmp_path / "nope.ckpt"), "--users", "1"])
    assert "nope.ckpt: no such file" in err


def test_run_without_checkpoint_and_the_artifact_fallbacks(trained, tmp_path, capsys):
    client = MlflowClient(trained.uri)
    exp = client.get_run(trained.run_id).info.experiment_id
    run = client.create_run(exp, tags={tracking.CHECKPOINT_DIR_TAG: str(tmp_path / "gone")}).info.run_id
    err = _cli_error(capsys, ["--run-id", run, "--tracking-uri", trained.uri, "--users", "1"])
    assert f"Run {run} has no checkpoint: none in {tmp_path / 'gone'}" in err
    assert "log_to_mlflow=true" in err and "--checkpoint PATH" in err

    folder = Path(trained.served.checkpoint).parent
    client.log_artifact(run, str(folder / "last.ckpt"), tracking.CHECKPOINT_ARTIFACTS)
    served = rec.load_run(run, trained.uri)
    assert served.checkpoint == f"runs:/{run}/checkpoints/last.ckpt"
    assert served.notes == [f"run {run} has no best checkpoint: using its artifact last.ckpt (the final weights)"]

    best = tmp_path / "upload" / "best.ckpt"
    best.parent.mkdir()
    shutil.copy(trained.served.checkpoint, best)
    client.log_artifact(run, str(best), tracking.CHECKPOINT_ARTIFACTS)
    served = rec.load_run(run, trained.uri)
    assert served.checkpoint == f"runs:/{run}/checkpoints/best.ckpt" and served.notes == []
    # the best checkpoint's weights, wherever they came from
    assert run_rec(SimpleNamespace(served=served), trained.user, k=5) == run_rec(trained, trained.user, k=5)


def test_checkpoint_without_a_config_cannot_be_rebuilt(trained, tmp_path, capsys):
    ckpt = torch.load(trained.served.checkpoint, map_location="cpu", weights_only=True)
    ckpt["mtl"]["config"] = None  # as a checkpoint written before runs stored their config in it
    ckpt["mtl"].pop("recipe", None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    err = _cli_error(capsys, ["--checkpoint", str(tmp_path / "old.ckpt"), "--users", "1"])
    assert "carries no run config" in err


def test_a_recipe_only_checkpoint_serves_identically(trained, tmp_path, capsys):
    """A checkpoint whose full config is stripped, carrying only the target-free recipe of its run (the group
    choices and overrides Hydra recorded), is rebuilt through Hydra's compose and serves the same lists."""
    cfg = compose_cfg([f"logger.mlflow.tracking_uri={trained.uri}", *trained.overrides], tmp_path)
    try:
        recipe = safe_config.recipe(*hydra_context(cfg))
    finally:
        GlobalHydra.instance().clear()
    assert not [o for o in recipe["overrides"] if "_target_" in o or o.lstrip("~+").startswith(("logger", "trainer"))]
    assert "data=recsys_synthetic" in recipe["overrides"] and "backbone=shared_bottom" in recipe["overrides"]
    ckpt = torch.load(trained.served.checkpoint, map_location="cpu", weights_only=True)
    ckpt["mtl"]["config"], ckpt["mtl"]["recipe"] = None, recipe
    torch.save(ckpt, tmp_path / "recipe.ckpt")
    served = rec.load_checkpoint(tmp_path / "recipe.ckpt")
    assert served.notes == []
    again = SimpleNamespace(served=served)
    new_user = trained.served.catalog.num_users + 3
    features = user_features(trained.served.catalog, trained.user)
    assert run_rec(again, trained.user) == run_rec(trained, trained.user)
    assert run_rec(again, trained.user, exclude_seen=True) == run_rec(trained, trained.user, exclude_seen=True)
    assert run_rec(again, new_user, user_features=features) == run_rec(trained, new_user, user_features=features)
    args = ["--users", str(trained.user), "--k", "5", "--format", "json"]
    assert rec.main(["--checkpoint", str(tmp_path / "recipe.ckpt"), *args]) == 0
    from_recipe = json.loads(capsys.readouterr().out)
    assert rec.main(["--checkpoint", trained.served.checkpoint, *args]) == 0
    assert from_recipe["users"] == json.loads(capsys.readouterr().out)["users"]


def test_dataset_without_a_catalogue(tmp_path, capsys, empty_store):
    """data=synthetic has no users or items; its run (no monitored checkpoint) also shows the last.ckpt fallback."""
    run_id = _train(tmp_path, [*TINY, "trainer.max_epochs=1", "~callbacks.model_checkpoint"], empty_store)
    folder = Path(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id).data.tags["mtl.checkpoint_dir"])
    path, note = rec.best_local_checkpoint(folder)
    assert path == folder / "last.ckpt" and note.startswith(f"no best checkpoint in {folder}: using last.ckpt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    err = _cli_error(capsys, ["--run-id", run_id, "--tracking-uri", uri, "--users", "1"])
    assert "has no catalogue of users and items, so it cannot serve recommendations" in err
    assert "mtl_experiments.data.synthetic" in err
