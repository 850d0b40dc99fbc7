"""ESMM (Ma et al., SIGIR 2018): pCTCVR = pCTR × pCVR by hand and at extreme logits, the paper's CTCVR loss,
where each loss's gradient goes, task validation, and a real training run."""

from __future__ import annotations

from decimal import Decimal, getcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl_experiments.backbone.esmm import ESMM, product_logit
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.pipeline import train
from mtl_experiments.tasks import build_tasks

TASKS = {"ctr": {"kind": "binary"}, "ctcvr": {"kind": "binary"}}
ESMM_TASKS = ["~data.tasks", "+data.tasks={ctr: {kind: binary}, ctcvr: {kind: binary}}"]


def make_model(tower_dims=(4, 3), tasks=TASKS, **kw) -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = FeatureEncoder(FeatureSpec(numeric=("x0", "x1"), categorical={"c": 5}), embedding_dim=2)
    backbone = ESMM(encoder.output_dim, list(tasks), tower_dims=tower_dims, **kw)
    return MultiTaskModel(encoder, backbone, build_tasks(tasks))


def features(n: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"numeric": torch.randn(n, 2, generator=g), "categorical": torch.randint(0, 5, (n, 1), generator=g)}


def exact_product_logit(a: float, b: float) -> float:
    """logit(σ(a)σ(b)) in 60-digit decimal arithmetic: the reference for the float32 computation."""
    getcontext().prec = 60
    p = 1 / (1 + (-Decimal(a)).exp()) / (1 + (-Decimal(b)).exp())
    return float((p / (1 - p)).ln())


def test_hand_computed_case_with_fixed_weights():
    """One-layer towers with set weights on x = [1, 2] (no embeddings): pCTCVR = pCTR · pCVR."""
    backbone = ESMM(2, ["ctr", "ctcvr"], tower_dims=[1])
    heads = {"ctr": nn.Linear(1, 1), "ctcvr": nn.Linear(1, 1)}
    with torch.no_grad():
        backbone.ctr_tower[0].weight.copy_(torch.tensor([[1.0, 0.5]]))  # relu(1 + 1 + 0) = 2
        backbone.ctr_tower[0].bias.zero_()
        backbone.cvr_tower[0].weight.copy_(torch.tensor([[0.5, -1.0]]))  # relu(0.5 - 2 + 3) = 1.5
        backbone.cvr_tower[0].bias.fill_(3.0)
        heads["ctr"].weight.fill_(0.5), heads["ctr"].bias.fill_(-0.2)  # a = 0.5·2 - 0.2 = 0.8
        heads["ctcvr"].weight.fill_(-2.0), heads["ctcvr"].bias.fill_(1.0)  # b = -2·1.5 + 1 = -2
    reps = backbone(torch.tensor([[1.0, 2.0]]))
    out = backbone.combine({t: heads[t](r) for t, r in reps.items()})
    p_ctr, p_cvr = 1 / (1 + torch.exp(torch.tensor(-0.8))), 1 / (1 + torch.exp(torch.tensor(2.0)))
    assert out["ctr"].item() == pytest.approx(0.8)
    assert backbone.cvr_logit.item() == pytest.approx(-2.0)
    assert torch.sigmoid(out["ctcvr"]).item() == pytest.approx((p_ctr * p_cvr).item(), abs=1e-6)  # ≈ 0.0821
    assert out["ctcvr"].item() == pytest.approx(exact_product_logit(0.8, -2.0), abs=1e-5)


def test_model_outputs_are_ctr_logit_and_ctcvr_logit_and_keep_pcvr():
    model = make_model()
    x = features()
    out = model(x)
    h = model.encoder(x)
    a = model.heads["ctr"](model.backbone.ctr_tower(h))
    b = model.heads["ctcvr"](model.backbone.cvr_tower(h))
    torch.testing.assert_close(out["ctr"], a)
    torch.testing.assert_close(model.backbone.cvr_logit, b)
    torch.testing.assert_close(torch.sigmoid(out["ctcvr"]), torch.sigmoid(a) * torch.sigmoid(b), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("a", "b"),
    [(0.0, 0.0), (30.0, 30.0), (-30.0, -30.0), (30.0, -30.0), (-30.0, 30.0), (17.0, 1.5), (-0.3, 25.0)],
)
def test_product_logit_is_exact_and_finite_at_extreme_logits(a, b):
    ta, tb = torch.tensor([a], requires_grad=True), torch.tensor([b], requires_grad=True)
    z = product_logit(ta, tb)
    assert torch.isfinite(z).all()
    assert abs(torch.sigmoid(z).item() - torch.sigmoid(ta).item() * torch.sigmoid(tb).item()) < 1e-6
    assert z.item() == pytest.approx(exact_product_logit(a, b), rel=1e-5, abs=1e-5)
    for label in (0.0, 1.0):  # the CTCVR loss and its gradient stay finite for either label
        ta.grad = tb.grad = None
        F.binary_cross_entropy_with_logits(product_logit(ta, tb), torch.tensor([label])).backward()
        assert torch.isfinite(ta.grad).all() and torch.isfinite(tb.grad).all()


def test_bce_on_the_ctcvr_output_is_the_papers_ctcvr_loss():
    """BCE-with-logits(logit(pq), y) = -y log(pq) - (1-y) log(1-pq), values and gradients (float64 reference)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3
    y = torch.randint(0, 2, (64,), generator=g).float()
    ours_a, ours_b = a.clone().requires_grad_(), b.clone().requires_grad_()
    ours = F.binary_cross_entropy_with_logits(product_logit(ours_a, ours_b), y)
    ours.backward()
    ref_a, ref_b = a.double().requires_grad_(), b.double().requires_grad_()
    p = torch.sigmoid(ref_a) * torch.sigmoid(ref_b)
    ref = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(ours_a.grad.double(), ref_a.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours_b.grad.double(), ref_b.grad, atol=1e-6, rtol=1e-4)


def grad_owners(model: MultiTaskModel, task: str) -> set[str]:
    """Top-level parts of the model (encoder, ctr_tower, cvr_tower, heads.<task>) that task's loss reaches."""
    model.zero_grad()
    out = model(features())
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    F.binary_cross_entropy_with_logits(out[task].squeeze(-1), labels).backward()
    owners = set()
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts = name.split(".")
            owners.add(".".join(parts[:2]) if parts[0] in ("heads", "backbone") else parts[0])
    return owners


def test_ctcvr_loss_reaches_both_towers_ctr_loss_only_the_ctr_tower():
    model = make_model()
    assert grad_owners(model, "ctr") == {"encoder", "backbone.ctr_tower", "heads.ctr"}
    assert grad_owners(model, "ctcvr") == {
        "encoder",
        "backbone.ctr_tower",
        "backbone.cvr_tower",
        "heads.ctr",
        "heads.ctcvr",
    }
    backbone = model.backbone
    assert {id(p) for p in model.shared_parameters()} == {id(p) for p in backbone.ctr_tower.parameters()}
    assert backbone.get_submodule(backbone.last_shared_layer) is backbone.ctr_tower[2]  # Linear, ReLU, Linear
    assert not backbone.has_representation


def test_custom_task_names_and_order():
    tasks = {"purchase": {"kind": "binary"}, "click": {"kind": "binary"}}
    model = make_model(tasks=tasks, ctr_task="click", ctcvr_task="purchase")
    out = model(features())
    assert list(out) == ["purchase", "click"]
    assert ESMM.required_tasks(ctr_task="click", ctcvr_task="purchase") == ["click", "purchase"]
    torch.testing.assert_close(
        torch.sigmoid(out["purchase"]), torch.sigmoid(out["click"]) * torch.sigmoid(model.backbone.cvr_logit)
    )


@pytest.mark.parametrize(
    ("names", "kw"),
    [(["y1", "y2"], {}), (["ctr"], {}), (["ctr", "ctcvr", "cvr"], {}), (["ctr", "ctcvr"], {"ctcvr_task": "buy"})],
)
def test_wrong_task_set_is_a_config_error_naming_tasks_and_fix(names, kw):
    with pytest.raises(ConfigError, match=r"backbone=esmm needs exactly two binary tasks") as e:
        ESMM(8, names, **kw)
    assert str(names) in str(e.value) and "backbone.ctr_task=" in str(e.value) and "+data.tasks=" in str(e.value)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"ctr_task": "ctcvr"}, "must differ"),
        ({"tower_dims": []}, "backbone.tower_dims"),
        ({"tower_dims": [4, 0]}, "backbone.tower_dims"),
        ({"dropout": 1.0}, "backbone.dropout"),
        ({"activation": "Relu"}, "backbone.activation"),
    ],
)
def test_bad_options_name_the_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        ESMM(8, ["ctr", "ctcvr"], **kw)


def test_non_binary_task_is_a_config_error():
    with pytest.raises(ConfigError, match=r"both tasks must be binary; got kinds \{'ctcvr': 'regression'\}"):
        make_model(tasks={"ctr": {"kind": "binary"}, "ctcvr": {"kind": "regression"}})


def test_default_data_tasks_stop_the_run_before_tracking(make_cfg, mlflow_runs):
    with pytest.raises(ConfigError, match=r"but the tasks are \['y1', 'y2'\]"):
        train(make_cfg("backbone=esmm", "data.num_samples=300"))
    assert mlflow_runs() == []


def test_trains_end_to_end_with_gradnorm_and_conflict_metrics(make_cfg, mlflow_runs):
    """GradNorm's W (the CTR tower's last Linear) and the conflict metrics on the CTR tower, through the real
    pipeline on synthetic labels (the plumbing only: synthetic ctcvr labels are not a subset of the clicks)."""
    cfg = make_cfg(
        "backbone=esmm",
        *ESMM_TASKS,
        "backbone.tower_dims=[16,8]",
        "loss=gradnorm",
        "module.conflict.every_n_steps=5",
        "trainer.max_epochs=1",
        "data.num_samples=600",
    )
    train(cfg)
    (run,) = mlflow_runs()
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("test/ctr/auroc", "test/ctcvr/auroc", "train/weight/ctcvr", "train/conflict/cosine/ctr-ctcvr"):
        assert key in m, key
    assert 0.0 <= m["test/ctcvr/auroc"] <= 1.0
