"""Sparse id tables (features.sparse=true) and optimizer=sparse_adam (mtl_experiments/optimizer/sparse_adam.py):
sparse gradients, the same updates as torch's SparseAdam + AdamW, state round trips, schedulers, a real run,
and the settings that cannot work with sparse gradients."""

from __future__ import annotations

import copy
import io
from functools import partial

import pytest
import torch
from torch import nn

from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.optimizer.sparse_adam import SparseDenseAdam, check_sparse_training, is_sparse, mark_sparse
from mtl_experiments.pipeline import train
from tests.conftest import RECSYS_TINY

SPEC = FeatureSpec(
    numeric=("x",), categorical={"user": 50, "item": 40, "city": 3}, id_columns={"user_id": "user", "item_id": "item"}
)


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(FeatureEncoder(SPEC, embedding_dim=4, sparse=True), nn.Linear(13, 1))


def tiny_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack(
        [
            torch.randint(1, 50, (16,), generator=g),
            torch.randint(1, 40, (16,), generator=g),
            torch.randint(0, 3, (16,), generator=g),
        ],
        dim=1,
    )
    return {"categorical": cat, "numeric": torch.randn(16, 1, generator=g)}


def step(model, opt, seed: int) -> None:
    opt.zero_grad()
    model(tiny_batch(seed)).pow(2).mean().backward()
    opt.step()


def test_id_tables_get_sparse_gradients_and_the_flag_the_rest_stays_dense():
    model = tiny_model()
    model(tiny_batch(0)).sum().backward()
    enc = model[0]
    flagged = {n for n, p in model.named_parameters() if is_sparse(p)}
    assert flagged == {"0.id_tables.user_id.table.weight", "0.id_tables.item_id.table.weight"}
    for key in ("user_id", "item_id"):
        grad = enc.id_tables[key].table.weight.grad
        assert grad.is_sparse and grad.coalesce().indices().numel() <= 16  # the batch's rows, not the table's
    assert not enc.embedding.weight.grad.is_sparse and not model[1].weight.grad.is_sparse


def test_steps_equal_torch_sparse_adam_for_tables_and_adamw_for_the_rest():
    ours, ref = tiny_model(), tiny_model()
    tables = [p for p in ref.parameters() if is_sparse(p)]
    dense = [p for p in ref.parameters() if not is_sparse(p)]
    opt = SparseDenseAdam(ours.parameters(), lr=0.05, weight_decay=0.1)
    ref_opts = [torch.optim.SparseAdam(tables, lr=0.05), torch.optim.AdamW(dense, lr=0.05, weight_decay=0.1)]
    before = ours[0].id_tables["user_id"].table.weight.detach().clone()
    for seed in range(4):
        step(ours, opt, seed)
        for o in ref_opts:
            o.zero_grad()
        ref(tiny_batch(seed)).pow(2).mean().backward()
        for o in ref_opts:
            o.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    touched = torch.unique(torch.cat([tiny_batch(s)["categorical"][:, 0] for s in range(4)]))
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[touched] = False
    weight = ours[0].id_tables["user_id"].table.weight
    assert torch.equal(weight[untouched], before[untouched])  # no weight decay, no moment update: rows not in a batch
    assert not torch.equal(weight[touched], before[touched])


def test_groups_are_split_in_sparse_and_dense_parts_keeping_their_options():
    model = tiny_model()
    extra = nn.Parameter(torch.zeros(2))
    opt = SparseDenseAdam([{"params": list(model.parameters())}, {"params": [extra], "weight_decay": 0.0}], lr=0.01)
    assert [g["sparse"] for g in opt.param_groups] == [True, False, False]
    assert opt.param_groups[2]["weight_decay"] == 0.0 and opt.param_groups[2]["params"] == [extra]
    assert opt._sparse.param_groups[0] is opt.param_groups[0] and opt._dense.param_groups[1] is opt.param_groups[2]


def test_state_dict_round_trip_continues_exactly(tmp_path):
    a = tiny_model()
    opt_a = SparseDenseAdam(a.parameters(), lr=0.05)
    for seed in range(2):
        step(a, opt_a, seed)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # what Lightning's safe checkpoint loading accepts
    b = tiny_model(seed=1)  # other initial weights: everything comes from the checkpoint
    b.load_state_dict(saved["model"])
    opt_b = SparseDenseAdam(b.parameters(), lr=0.05)
    opt_b.load_state_dict(saved["opt"])
    assert opt_b._sparse.state is opt_b.state and opt_b._sparse.param_groups[0] is opt_b.param_groups[0]
    for seed in range(2, 4):
        step(a, opt_a, seed)
        step(b, opt_b, seed)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    fresh = tiny_model()
    opt_fresh = SparseDenseAdam(fresh.parameters(), lr=0.05)
    step(fresh, opt_fresh, 2)  # without the state the same step differs (the test can fail)
    assert not torch.equal(fresh[1].weight, tiny_model()[1].weight)


def test_deepcopy_keeps_a_working_optimizer():
    model = tiny_model()
    opt = SparseDenseAdam(model.parameters(), lr=0.05)
    step(model, opt, 0)
    clone = copy.deepcopy({"model": model, "opt": opt})  # one memo: the copy's groups hold the copied params
    assert clone["opt"]._dense.param_groups[0] is clone["opt"].param_groups[1]
    for p in clone["model"][0].id_tables.parameters():
        mark_sparse(p)  # deepcopy drops attributes of parameters
    step(clone["model"], clone["opt"], 1)


def test_a_scheduler_changes_every_learning_rate():
    model = tiny_model()
    opt = SparseDenseAdam(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    step(model, opt, 0)
    scheduler.step()
    assert opt._sparse.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt._dense.param_groups[0]["lr"] == pytest.approx(0.05)


def test_an_unflagged_sparse_gradient_is_a_clear_error():
    table = nn.Embedding(5, 2, sparse=True)  # not marked: SparseDenseAdam puts it with the dense parameters
    opt = SparseDenseAdam(table.parameters())
    table(torch.tensor([1])).sum().backward()
    with pytest.raises(ConfigError, match="has a sparse gradient, but was not marked sparse"):
        opt.step()


@pytest.mark.parametrize(
    ("optimizer", "clip", "message"),
    [
        (partial(torch.optim.Adam, lr=0.01), 0.0, "Adam cannot step .* Use optimizer=sparse_adam"),
        (partial(torch.optim.AdamW, lr=0.01), 0.0, "Use optimizer=sparse_adam"),
        (partial(torch.optim.SGD, lr=0.01, weight_decay=0.1), 0.0, "SGD cannot step"),
        (partial(SparseDenseAdam, lr=0.01), 1.0, "module.gradient_clip_val=1.0 clips gradients by norm"),
        (partial(SparseDenseAdam, lr=0.01), None, None),
        (partial(torch.optim.SGD, lr=0.01), None, None),  # torch's SGD takes sparse gradients
    ],
)
def test_check_sparse_training(optimizer, clip, message):
    model = tiny_model()
    if message is None:
        check_sparse_training(model, optimizer, 0.0)
        return
    with pytest.raises(ConfigError, match=message):
        check_sparse_training(model, optimizer, clip)
    check_sparse_training(nn.Linear(2, 1), optimizer, 1.0)  # no sparse parameter: nothing to refuse


def recsys(make_cfg, tmp_path, *overrides):
    return make_cfg(
        "data=recsys_synthetic",
        *RECSYS_TINY,
        f"data.cache_dir={tmp_path / 'cache'}",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=5",
        "trainer.enable_model_summary=false",
        "~callbacks.progress_bar",
        *overrides,
        tiny=False,
    )


def test_a_real_run_trains_sparse_tables_with_sparse_adam(make_cfg, mlflow_runs, tmp_path):
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from mtl_experiments.pipeline import build_model

    cfg = recsys(make_cfg, tmp_path, "features.sparse=true", "optimizer=sparse_adam", "scheduler=cosine")
    train(cfg)
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED" and run.data.params["optimizer._target_"].endswith("SparseDenseAdam")
    assert 0 <= run.data.metrics["test/click/auroc"] <= 1
    (last,) = (tmp_path / "out").rglob("last.ckpt")
    ckpt = torch.load(last, weights_only=True)
    groups = ckpt["optimizer_states"][0]["param_groups"]
    assert groups[0]["sparse"] and any(not g["sparse"] for g in groups)
    assert ckpt["optimizer_states"][0]["state"]  # the moments of tables and dense layers are checkpointed
    # the initial weights (the run's seed): trained rows moved, row 0 (no row has id 0) is exactly as initialised
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup()
    pl.seed_everything(cfg.seed)
    initial = build_model(cfg, dm).encoder.id_tables["user_id"].table.weight.detach()
    trained = ckpt["state_dict"]["model.encoder.id_tables.user_id.table.weight"]
    assert trained.shape == (201, 8) and torch.equal(trained[0], initial[0])
    seen = dm.seen_ids()["user_id"]
    assert (trained[seen] != initial[seen]).any(1).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["features.sparse=true"], "optimizer=sparse_adam"),  # the default optimizer=adam cannot
        (["features.sparse=true", "optimizer=sparse_adam", "module.gradient_clip_val=1.0"], "gradient_clip_val=0"),
    ],
)
def test_sparse_settings_that_cannot_work_stop_before_tracking(make_cfg, mlflow_runs, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(recsys(make_cfg, tmp_path, *overrides))
    assert mlflow_runs() == []
