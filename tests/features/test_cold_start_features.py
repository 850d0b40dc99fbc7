"""New-user / new-item representations of the feature encoder (mtl_experiments/features.py): random, mean,
features (ID dropout), pretrained item vectors (.npy / Parquet), and their config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError
from mtl_experiments.features import FeatureEncoder

USERS, ITEMS = 6, 5  # rows incl. the reserved id 0
SEEN = {"user_id": torch.tensor([1, 2, 3]), "item_id": torch.tensor([1, 2])}
STRATEGY_OPTIONS = [  # (id key, option, strategy)
    ("user_id", "new_users", "mean"),
    ("user_id", "new_users", "features"),
    ("item_id", "new_items", "mean"),
    ("item_id", "new_items", "features"),
    ("item_id", "new_items", "pretrained"),
]


def make_spec(id_columns=None) -> FeatureSpec:
    ids = {"user_id": "user", "item_id": "item"} if id_columns is None else id_columns
    return FeatureSpec(
        numeric=("x",), categorical={"city": 3, "user": USERS, "item": ITEMS, "device": 2}, id_columns=ids
    )


def batch(users, items) -> dict:
    users, items = torch.tensor(users), torch.tensor(items)
    n = len(users)
    cat = torch.stack([torch.arange(n) % 3, users, items, torch.arange(n) % 2], dim=1)
    return {"categorical": cat, "numeric": torch.arange(n, dtype=torch.float32)[:, None]}


def column(encoder: FeatureEncoder, out: torch.Tensor, name: str) -> torch.Tensor:
    """The slice of the encoder's output that holds column ``name``'s embedding."""
    start = 0
    for c in encoder.spec.categorical:
        if c == name:
            return out[:, start : start + encoder.embedding_dims[c]]
        start += encoder.embedding_dims[c]
    raise KeyError(name)


@pytest.fixture
def vectors_npy(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((ITEMS, 3)).astype(np.float32)
    vectors[0] = 0
    path = tmp_path / "items.npy"
    np.save(path, vectors)
    return path


def encoder_for(key: str, strategy: str, vectors: Path, **kwargs) -> FeatureEncoder:
    option = "new_users" if key == "user_id" else "new_items"
    extra = {"item_vectors": str(vectors)} if strategy == "pretrained" else {}
    return FeatureEncoder(make_spec(), embedding_dim=4, **{option: strategy, **extra, **kwargs})


# -- layout ---------------------------------------------------------------------------------------------
def test_random_default_keeps_the_one_shared_table():
    enc = FeatureEncoder(make_spec(), embedding_dim=4)
    assert enc.shared_table and len(enc.id_tables) == 0
    assert set(enc.state_dict()) == {"embedding.weight"}  # checkpoints of earlier runs still load


@pytest.mark.parametrize(("key", "option", "strategy"), STRATEGY_OPTIONS)
def test_a_strategy_gives_its_id_column_its_own_table_and_keeps_the_layout(key, option, strategy, vectors_npy):
    enc = encoder_for(key, strategy, vectors_npy)
    other = {"user_id": "item_id", "item_id": "user_id"}[key]
    assert set(enc.id_tables) == {key} and enc.shared_table
    assert enc.embedding.num_embeddings == 3 + 2 + (USERS if key == "item_id" else ITEMS)  # the rest share it
    assert enc.output_dim == 4 * 4 + 1
    b = batch([1, 4, 2], [2, 1, 3])
    out = enc(b)
    assert out.shape == (3, 17)
    # the other columns sit where they always did: city is the shared table's first block
    assert torch.equal(column(enc, out, "city"), enc.embedding.weight[b["categorical"][:, 0]])
    assert torch.equal(out[:, -1], b["numeric"][:, 0])
    assert enc.id_index == {key: ["city", "user", "item", "device"].index({"user_id": "user", "item_id": "item"}[key])}
    assert other not in enc.id_tables


def test_per_column_dimensions_still_work_beside_an_id_table():
    enc = FeatureEncoder(make_spec(), embedding_dim=4, embedding_dims={"city": 2}, new_users="mean")
    assert not enc.shared_table and len(enc.embeddings) == 3
    out = enc(batch([1, 2], [1, 2]))
    assert out.shape == (2, 2 + 4 + 4 + 4 + 1)
    assert torch.equal(column(enc, out, "user"), enc.id_tables["user_id"].table.weight[[1, 2]])


# -- the strategies -------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_random_uses_the_unseen_ids_own_row_which_training_never_moves(sparse):
    from mtl_experiments.optimizer.sparse_adam import SparseDenseAdam

    torch.manual_seed(0)
    enc = FeatureEncoder(make_spec(), embedding_dim=4, sparse=sparse)
    enc.set_seen(SEEN)
    table = enc.id_tables["user_id"].table.weight if sparse else enc.embedding.weight
    offset = 0 if sparse else 3  # the user column's block in the shared table
    before = table.detach().clone()
    opt = SparseDenseAdam(enc.parameters(), lr=0.1) if sparse else torch.optim.Adam(enc.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        enc(batch([1, 2, 3], [1, 2, 1])).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(table[offset + 1], before[offset + 1])  # seen: trained
    assert torch.equal(table[offset + 4], before[offset + 4])  # unseen: its seeded initial row, untouched
    enc.eval()
    assert torch.equal(column(enc, enc(batch([4], [1])), "user")[0], table[offset + 4])


@pytest.mark.parametrize("key", ["user_id", "item_id"])
def test_mean_gives_an_unseen_id_the_mean_of_the_seen_rows_in_eval(key):
    enc = FeatureEncoder(make_spec(), embedding_dim=4, **{"new_users" if key == "user_id" else "new_items": "mean"})
    enc.set_seen(SEEN)
    weight = enc.id_tables[key].table.weight.detach()
    col = "user" if key == "user_id" else "item"
    b = batch([1, 4, 5, 0], [1, 3, 4, 2])
    ids = b["categorical"][:, 1 if key == "user_id" else 2]
    seen = torch.isin(ids, SEEN[key])
    expected_mean = weight[SEEN[key]].mean(0)
    enc.train()  # training mode: every id its own row
    assert torch.equal(column(enc, enc(b), col), weight[ids])
    enc.eval()
    out = column(enc, enc(b), col)
    assert torch.equal(out[seen], weight[ids[seen]])
    torch.testing.assert_close(out[~seen], expected_mean.expand(int((~seen).sum()), -1), rtol=0, atol=1e-6)


@pytest.mark.parametrize("key", ["user_id", "item_id"])
def test_features_strategy_uses_row_zero_for_unseen_ids_in_eval(key):
    enc = FeatureEncoder(make_spec(), embedding_dim=4, **{"new_users" if key == "user_id" else "new_items": "features"})
    enc.set_seen(SEEN)
    weight = enc.id_tables[key].table.weight.detach()
    b = batch([1, 4, 5, 2], [2, 3, 4, 1])
    ids = b["categorical"][:, 1 if key == "user_id" else 2]
    seen = torch.isin(ids, SEEN[key])
    enc.eval()
    out = column(enc, enc(b), "user" if key == "user_id" else "item")
    assert torch.equal(out[seen], weight[ids[seen]])
    assert torch.equal(out[~seen], weight[0].expand(int((~seen).sum()), -1))


@pytest.mark.parametrize("p", [0.1, 0.4])
def test_id_dropout_replaces_ids_by_row_zero_at_rate_p_in_training(p):
    enc = FeatureEncoder(make_spec(), embedding_dim=4, new_users="features", id_dropout=p)
    enc.set_seen(SEEN)  # seen ids only matter in eval
    n = 20_000
    b = batch(torch.randint(1, USERS, (n,), generator=torch.Generator().manual_seed(1)).tolist(), [1] * n)
    weight = enc.id_tables["user_id"].table.weight.detach()
    enc.train()
    torch.manual_seed(0)
    out = column(enc, enc(b), "user")
    dropped = (out == weight[0]).all(1)
    assert abs(dropped.float().mean().item() - p) < 0.02  # binomial std ~0.0035 at n=20000
    kept = ~dropped
    assert torch.equal(out[kept], weight[b["categorical"][kept, 1]])
    torch.manual_seed(0)  # the run's seed fixes which ids are dropped
    assert torch.equal(column(enc, enc(b), "user"), out)


def test_seen_ids_travel_in_the_state_dict():
    enc = FeatureEncoder(make_spec(), embedding_dim=4, new_users="mean", new_items="features")
    enc.set_seen(SEEN)
    state = enc.state_dict()
    assert state["id_tables.user_id.seen"].tolist() == [False, True, True, True, False, False]
    fresh = FeatureEncoder(make_spec(), embedding_dim=4, new_users="mean", new_items="features")
    assert fresh.id_tables["user_id"].seen.all()  # before set_seen every id counts as seen
    fresh.load_state_dict(state)
    assert torch.equal(fresh.id_tables["item_id"].seen, enc.id_tables["item_id"].seen)
    enc.eval(), fresh.eval()
    b = batch([4, 1], [3, 2])
    assert torch.equal(enc(b), fresh(b))


def test_set_seen_rejects_ids_outside_the_table():
    enc = FeatureEncoder(make_spec(), embedding_dim=4, new_users="mean")
    with pytest.raises(ConfigError, match="0..5"):
        enc.set_seen({"user_id": torch.tensor([1, 6])})


# -- pretrained item vectors ------------------------------------------------------------------------------
def test_pretrained_frozen_rows_are_the_file_vectors_projected(vectors_npy):
    vectors = torch.from_numpy(np.load(vectors_npy))
    enc = FeatureEncoder(make_spec(), embedding_dim=4, new_items="pretrained", item_vectors=str(vectors_npy))
    table = enc.id_tables["item_id"]
    assert isinstance(table.projection, torch.nn.Linear) and table.projection.in_features == 3
    assert not any(p is table.vectors for p in enc.parameters())  # frozen: a buffer, no optimizer sees it
    b = batch([1, 2, 4], [4, 0, 2])
    out = column(enc, enc(b), "item")
    torch.testing.assert_close(out, table.projection(vectors[[4, 0, 2]]))
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    enc(b).sum().backward()
    opt.step()
    assert torch.equal(table.vectors, vectors)  # the file's vectors stay; the projection learns
    assert "id_tables.item_id.vectors" in enc.state_dict()  # a checkpoint loads without the file


def test_pretrained_same_dimension_uses_the_vectors_as_they_are(vectors_npy):
    enc = FeatureEncoder(make_spec(), embedding_dim=3, new_items="pretrained", item_vectors=str(vectors_npy))
    assert isinstance(enc.id_tables["item_id"].projection, torch.nn.Identity)
    out = column(enc, enc(batch([1, 1], [3, 1])), "item")
    assert torch.equal(out, torch.from_numpy(np.load(vectors_npy))[[3, 1]])


@pytest.mark.parametrize("sparse", [False, True])
def test_pretrained_trainable_vectors_are_fine_tuned(vectors_npy, sparse):
    from mtl_experiments.optimizer.sparse_adam import SparseDenseAdam

    enc = FeatureEncoder(
        make_spec(),
        embedding_dim=3,
        new_items="pretrained",
        item_vectors=str(vectors_npy),
        item_vectors_trainable=True,
        sparse=sparse,
    )
    weight = enc.id_tables["item_id"].table.weight
    original = torch.from_numpy(np.load(vectors_npy))
    assert torch.equal(weight.detach(), original) and weight.requires_grad
    opt = SparseDenseAdam(enc.parameters(), lr=0.1)
    enc(batch([1, 2], [2, 3])).sum().backward()
    assert weight.grad.is_sparse is sparse
    opt.step()
    assert not torch.equal(weight[2], original[2]) and torch.equal(weight[4], original[4])


def test_parquet_vectors_are_placed_by_item_id_in_any_order(tmp_path, vectors_npy):
    vectors = np.load(vectors_npy)
    order = [3, 1, 4, 2]  # shuffled; id 0 absent: zeros
    list_file = tmp_path / "list.parquet"
    pd.DataFrame({"item_id": order, "vector": [vectors[i].tolist() for i in order]}).to_parquet(list_file)
    wide_file = tmp_path / "wide.parquet"
    pd.DataFrame({"item_id": order, **{f"v{j}": vectors[order, j] for j in range(3)}}).to_parquet(wide_file)
    for path in (list_file, wide_file):
        enc = FeatureEncoder(make_spec(), embedding_dim=3, new_items="pretrained", item_vectors=str(path))
        torch.testing.assert_close(enc.id_tables["item_id"].vectors, torch.from_numpy(vectors))


def test_pretrained_defaults_to_the_datasets_content_vectors(vectors_npy):
    enc = FeatureEncoder(make_spec(), embedding_dim=3, new_items="pretrained", default_item_vectors=vectors_npy)
    assert torch.equal(enc.id_tables["item_id"].vectors, torch.from_numpy(np.load(vectors_npy)))


def test_recsys_content_vectors_serve_new_items_through_the_pipeline(make_cfg, tiny_data):
    """features.item_vectors=null on recsys_synthetic: the dataset's content vectors file, rows = item ids."""
    from hydra.utils import instantiate

    from mtl_experiments.pipeline import build_model

    cfg = make_cfg("data=recsys_synthetic", *tiny_data("recsys_synthetic"), "features.new_items=pretrained", tiny=False)
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    model = build_model(cfg, dm)
    table = model.encoder.id_tables["item_id"]
    assert torch.equal(table.vectors, torch.from_numpy(np.load(dm.content_vectors_path)))
    assert table.vectors.shape == (101, 8)  # content_dim 8 = features.embedding_dim 8: no projection
    assert isinstance(table.projection, torch.nn.Identity)


# -- errors -----------------------------------------------------------------------------------------------
def _write_bad_files(tmp_path: Path) -> dict[str, Path]:
    np.save(tmp_path / "rows.npy", np.zeros((ITEMS - 1, 3), dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.zeros(ITEMS, dtype=np.float32))
    pd.DataFrame({"item_id": [1, 2], "vector": [[0.0, 1.0], [1.0, 0.0]]}).to_parquet(tmp_path / "missing.parquet")
    pd.DataFrame({"id": [1, 2, 3, 4], "v": [0.0, 1.0, 2.0, 3.0]}).to_parquet(tmp_path / "noid.parquet")
    pd.DataFrame({"item_id": [1, 2, 3, 4, 9], "v": [0.0] * 5}).to_parquet(tmp_path / "range.parquet")
    (tmp_path / "vectors.csv").write_text("item_id,v\n1,0\n")
    return {p.stem: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    ("kwargs", "spec_ids", "message"),
    [
        ({"new_users": "pretrained"}, None, "pretrained vectors exist for items only"),
        ({"new_items": "popular"}, None, r"must be one of \['random', 'mean', 'features', 'pretrained'\]"),
        ({"new_users": "mean"}, {"item_id": "item"}, "needs a user id column"),
        ({"new_items": "features"}, {}, "needs an item id column"),
        ({"new_items": "features", "id_dropout": 0.0}, None, "id_dropout > 0"),
        ({"id_dropout": 1.0}, None, r"id_dropout must be a number in \[0, 1\), got 1.0"),
        ({"sparse": True}, {}, "no id columns"),
        ({"new_items": "pretrained"}, None, "needs item vectors: set features.item_vectors"),
        ({"new_items": "pretrained", "item_vectors": "nowhere.npy"}, None, "Item vectors file not found"),
        ({"new_items": "pretrained", "item_vectors": "rows"}, None, r"shape \(4, 3\); expected \[5, d\]"),
        ({"new_items": "pretrained", "item_vectors": "flat"}, None, r"shape \(5,\)"),
        ({"new_items": "pretrained", "item_vectors": "missing"}, None, r"lack 2 item id\(s\), e.g. \[3, 4\]"),
        ({"new_items": "pretrained", "item_vectors": "noid"}, None, "no 'item_id' column"),
        ({"new_items": "pretrained", "item_vectors": "range"}, None, r"item ids \[9\] outside 0..4"),
        ({"new_items": "pretrained", "item_vectors": "vectors"}, None, "unsupported file type '.csv'"),
    ],
)
def test_config_errors_name_the_problem(kwargs, spec_ids, message, tmp_path):
    files = _write_bad_files(tmp_path)
    if kwargs.get("item_vectors") in files:
        kwargs = {**kwargs, "item_vectors": str(files[kwargs["item_vectors"]])}
    with pytest.raises(ConfigError, match=message):
        FeatureEncoder(make_spec(spec_ids), embedding_dim=4, **kwargs)


def test_a_strategy_on_a_dataset_without_ids_stops_the_run_before_tracking(make_cfg, mlflow_runs):
    from mtl_experiments.pipeline import train

    with pytest.raises(ConfigError, match="features.new_users=mean needs a user id column"):
        train(make_cfg("features.new_users=mean"))  # data=synthetic has no id columns
    assert mlflow_runs() == []
