"""GradNorm (Chen et al., ICML 2018) against its definition: one step by hand, the 10x toy through the
real module, W = the last shared layer, resume through state_dict, config validation."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.backbone.single_task import SingleTask
from mtl_experiments.data.base import TensorBatchLoader
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.grads import task_gradients
from mtl_experiments.loss.gradnorm import GradNorm, gradnorm_loss
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule
from mtl_experiments.tasks import build_tasks
from mtl_experiments.tasks.regression import RegressionTask
from tests.conftest import CONF, backbone_task_names, bare_trainer, compose_cfg, options

TWO = build_tasks({"a": {"kind": "regression"}, "b": {"kind": "regression"}})


SGD = {"_target_": "torch.optim.SGD", "lr": 0.1}  # merged into the YAML's optimizer partial (_partial_: true stays)


def gradnorm(tasks=TWO, model=None, **overrides) -> GradNorm:
    cfg = OmegaConf.merge(OmegaConf.load(CONF / "loss" / "gradnorm.yaml"), overrides)
    g = instantiate(cfg, _convert_="all")
    g.setup(tasks, model)
    return g


# -- (a) one step by hand ---------------------------------------------------------------------------
def linear_toy_step(W: nn.Linear, c, u1, u2):
    """L_t = c_t + (W x)·u_t with x = e_1, so ∇_W L_t = u_t e_1ᵀ and ||∇_W L_t|| = ||u_t||."""
    h = W(torch.tensor([1.0, 0.0]))
    return torch.stack([c[0] + h @ torch.tensor(u1), c[1] + h @ torch.tensor(u2)])


def test_two_sgd_steps_by_hand():
    W = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        W.weight.copy_(torch.eye(2))  # h = W e_1 = e_1
    g = gradnorm(alpha=1.5, optimizer=SGD)

    # step 1: L = [1 + 1, 4 + 0] = [2, 4], ||∇_W L|| = [1, 3]; L(0) = L so r = [1, 1]
    losses = linear_toy_step(W, (1.0, 4.0), (1.0, 0.0), (0.0, 3.0))
    grads = task_gradients(losses, [W.weight])
    weights = g.backward(losses, grads, [W.weight], lambda total, exclude=(): total.backward())
    assert weights.tolist() == [1.0, 1.0]  # the model is updated with this step's w, before w's own update
    assert torch.allclose(W.weight.grad, torch.tensor([[1.0, 0.0], [3.0, 0.0]]))  # 1·u_1 e_1ᵀ + 1·u_2 e_1ᵀ
    # G = [1, 3], mean 2, targets [2, 2]; L_grad = |1-2| + |3-2| = 2
    # ∇_w L_grad = sign(G - target)·||∇_W L|| = [-1, +3]; SGD: w = [1 + 0.1, 1 - 0.3] = [1.1, 0.7]
    # renormalise to Σw = 2: [1.1, 0.7]·2/1.8 = [11/9, 7/9]
    logged = g.log_values()
    assert logged["gradnorm/loss"].item() == pytest.approx(2.0)
    assert logged["gradnorm/weighted_grad_norm/a"].item() == pytest.approx(1.0)
    assert logged["gradnorm/weighted_grad_norm/b"].item() == pytest.approx(3.0)
    assert torch.allclose(g.w, torch.tensor([11 / 9, 7 / 9]))

    # step 2: L = [-1 + 2, 4 + 0] = [1, 4], ||∇_W L|| = [2, 1]
    W.weight.grad = None
    losses = linear_toy_step(W, (-1.0, 4.0), (2.0, 0.0), (0.0, 1.0))
    grads = task_gradients(losses, [W.weight])
    weights = g.backward(losses, grads, [W.weight], lambda total, exclude=(): total.backward())
    assert torch.allclose(weights, torch.tensor([11 / 9, 7 / 9]))
    assert torch.allclose(W.weight.grad, torch.tensor([[22 / 9, 0.0], [7 / 9, 0.0]]))
    # L̃ = [1/2, 4/4] = [0.5, 1], mean 0.75, r = [2/3, 4/3]
    # G = w·||∇L|| = [22/9, 7/9], mean(G) = 29/18; targets = 29/18·r^1.5
    r = torch.tensor([2 / 3, 4 / 3])
    target = 29 / 18 * r**1.5  # ≈ [0.8769, 2.4804]
    G = torch.tensor([22 / 9, 7 / 9])
    logged = g.log_values()
    assert torch.allclose(logged["gradnorm/inverse_rate/a"], r[0])
    assert logged["gradnorm/loss"].item() == pytest.approx((G - target).abs().sum().item(), rel=1e-6)  # ≈ 3.2701
    # G - target ≈ [+1.57, -1.70] -> ∇_w L_grad = [+2, -1]; SGD: w = [11/9 - 0.2, 7/9 + 0.1]; Σ = 1.9
    expected = torch.tensor([11 / 9 - 0.2, 7 / 9 + 0.1]) * 2 / 1.9  # ≈ [1.0760, 0.9240]
    assert torch.allclose(g.w, expected)
    assert g.w.sum().item() == pytest.approx(2.0)


def test_the_written_out_gradient_is_autograds():
    """∇_w L_grad by autograd on w, the norms detached and the target mean(G)·r^α held constant."""
    torch.manual_seed(0)
    for _ in range(5):
        w = torch.randn(4).requires_grad_(True)  # negative weights included: G_t = |w_t|·||∇_W L_t||
        norms, rate = torch.rand(4) + 0.1, torch.rand(4) + 0.5
        G = w.abs() * norms
        loss = (G - G.detach().mean() * rate**1.5).abs().sum()
        (expected,) = torch.autograd.grad(loss, w)
        weighted, loss_grad, grad = gradnorm_loss(w.detach(), norms, rate, 1.5)
        assert torch.allclose(weighted, G.detach()) and torch.allclose(loss_grad, loss.detach())
        assert torch.allclose(grad, expected)


def test_adam_first_step_moves_each_weight_by_lr():
    """Adam's first step is lr·g/(|g| + eps) ≈ lr·sign(g), whatever the scale of the gradient norms."""
    W = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        W.weight.copy_(torch.eye(2))
    g = gradnorm(optimizer={"lr": 0.1})  # the YAML's Adam
    losses = linear_toy_step(W, (1.0, 4.0), (1.0, 0.0), (0.0, 3.0))  # ∇_w L_grad = [-1, +3] as above
    g.backward(losses, task_gradients(losses, [W.weight]), [W.weight], lambda total, exclude=(): total.backward())
    assert torch.allclose(g.w, torch.tensor([1.1, 0.9]))  # Σ = 2 already


def test_initial_loss_is_the_mean_of_the_first_n_steps():
    g = gradnorm(initial_loss_steps=2)
    grads = torch.ones(2, 3)
    for step_losses in ([2.0, 4.0], [4.0, 4.0]):
        g.backward(torch.tensor(step_losses, requires_grad=True), grads, [], lambda total, exclude=(): total.backward())
    assert g.initial_losses.tolist() == [3.0, 4.0]  # mean of the first two steps
    g.backward(torch.tensor([1.0, 1.0], requires_grad=True), grads, [], lambda total, exclude=(): total.backward())
    assert g.initial_losses.tolist() == [3.0, 4.0]  # fixed from then on
    # L̃ = [1/3, 1/4], mean 7/24, r = [8/7, 6/7]
    logged = g.log_values()
    assert logged["gradnorm/inverse_rate/a"].item() == pytest.approx(8 / 7)
    assert logged["gradnorm/inverse_rate/b"].item() == pytest.approx(6 / 7)


def test_without_task_gradients_it_is_equal_weighting():
    g = gradnorm()
    theta = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = torch.stack([theta[0] ** 2, 3 * theta[1]])
    weights = g.backward(losses, None, [], lambda total, exclude=(): total.backward())
    assert weights.tolist() == [1.0, 1.0] and g.w.tolist() == [1.0, 1.0]
    assert theta.grad.tolist() == [2.0, 3.0]
    assert g.log_values() == {}


# -- (b) the 10x toy through the real module ------------------------------------------------------------
class TenTimesRegression(RegressionTask):
    """The same MSE, scaled by 10: its gradient on W is 10x the unscaled task's."""

    def loss(self, output, target):
        return 10 * super().loss(output, target)


class Record(pl.Callback):
    def __init__(self):
        self.sums, self.ratios, self.weights = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        g = module.weighting
        self.sums.append(g.w.sum().item())
        self.weights.append(g.w.tolist())
        logged = g.log_values()  # G_t = w_t·||∇_W L_t|| of this step, w before its update
        self.ratios.append((logged["gradnorm/weighted_grad_norm/b"] / logged["gradnorm/weighted_grad_norm/a"]).item())


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
def test_weighted_gradient_norms_converge_on_the_ten_times_toy():
    torch.manual_seed(0)
    n, d = 512, 8
    x = torch.randn(n, d)
    y = torch.sin(x @ torch.randn(d)) + 0.1 * torch.randn(n)
    split = {"features": {"numeric": x}, "labels": {"a": y, "b": y}}  # the same labels for both tasks
    tasks = {"a": RegressionTask("a"), "b": TenTimesRegression("b")}
    encoder = FeatureEncoder(FeatureSpec(numeric=tuple(f"x{i}" for i in range(d))))
    model = MultiTaskModel(encoder, SharedBottom(d, list(tasks), (16,), (8,)), tasks)
    model.backbone.towers["b"].load_state_dict(model.backbone.towers["a"].state_dict())
    model.heads["b"].load_state_dict(model.heads["a"].state_dict())  # so ∇_W L_b = 10·∇_W L_a at step 1
    weighting = gradnorm(tasks, model)  # defaults: alpha 1.5, Adam lr 0.025
    module = MTLModule(model, tasks, weighting, functools.partial(torch.optim.SGD, lr=0.01), train_metrics=False)
    record = Record()
    trainer = bare_trainer(max_steps=200, callbacks=[record])
    trainer.fit(module, train_dataloaders=TensorBatchLoader(split, batch_size=64, shuffle=True))
    assert len(record.sums) == 200
    assert all(abs(s - 2.0) < 1e-5 for s in record.sums)  # Σ w_t = T at every step
    assert record.ratios[0] == pytest.approx(10.0, rel=1e-4)
    final = sum(record.ratios[-20:]) / 20
    assert 0.7 < final < 1.4, record.ratios[::10]  # ~1: the same labels, so r_a ≈ r_b
    w_a, w_b = record.weights[-1]
    assert 5 * w_b < w_a  # the 10x task is down-weighted (balance at w_a = 10·w_b)


# -- (c) W is the last shared layer -------------------------------------------------------------------
def encoder_with_embedding() -> FeatureEncoder:
    return FeatureEncoder(FeatureSpec(numeric=("x0", "x1"), categorical={"c": 5}), embedding_dim=4)


def test_shared_bottom_w_is_the_last_linear_of_the_bottom_never_the_embedding():
    encoder = encoder_with_embedding()
    backbone = SharedBottom(encoder.output_dim, list(TWO), (16, 8), (4,))
    model = MultiTaskModel(encoder, backbone, TWO)
    g = gradnorm(model=model)
    (W,) = g.task_grad_inputs(model)
    assert W is backbone.bottom[2].weight  # Linear(6, 16), ReLU, Linear(16, 8), ReLU
    assert W is not encoder.embedding.weight
    x = {"numeric": torch.randn(5, 2), "categorical": torch.randint(0, 5, (5, 1))}
    out = model(x)
    losses = torch.stack([out[t].square().mean() for t in TWO])
    assert task_gradients(losses, g.task_grad_inputs(model)).shape == (2, 8 * 16)


def test_layer_option_overrides_and_is_validated():
    encoder = encoder_with_embedding()
    model = MultiTaskModel(encoder, SharedBottom(encoder.output_dim, list(TWO), (16, 8), (4,)), TWO)
    assert gradnorm(model=model, layer="bottom.0").task_grad_inputs(model) == [model.backbone.bottom[0].weight]
    with pytest.raises(ConfigError, match=r"loss.layer='towers.a.0' is not a shared layer.*\['bottom.0', 'bottom.2'\]"):
        gradnorm(model=model, layer="towers.a.0")
    with pytest.raises(ConfigError, match=r"loss.layer='nope' is not a shared layer"):
        gradnorm(model=model, layer="nope")


def test_single_task_backbone_has_no_w():
    encoder = encoder_with_embedding()
    model = MultiTaskModel(encoder, SingleTask(encoder.output_dim, list(TWO), (8,)), TWO)
    assert gradnorm(model=model).layer_path is None  # the module passes no task gradients: equal weights
    with pytest.raises(ConfigError, match="loss.layer='nets.a.0' is not a shared layer"):
        gradnorm(model=model, layer="nets.a.0")


@pytest.mark.parametrize("name", options("backbone"))
def test_w_is_one_shared_dense_weight_for_every_backbone(name):
    encoder = encoder_with_embedding()
    cfg = OmegaConf.load(CONF / "backbone" / f"{name}.yaml")
    names = backbone_task_names(name, list(TWO))  # a backbone that requires its tasks (ESMM) gets them, binary
    tasks = TWO if names == list(TWO) else build_tasks({n: {"kind": "binary"} for n in names})
    backbone = instantiate(cfg, input_dim=encoder.output_dim, task_names=names, _convert_="all")
    model = MultiTaskModel(encoder, backbone, tasks)
    g = gradnorm(tasks, model=model)
    if not model.shared_parameters():
        assert g.layer_path is None
        return
    (W,) = g.task_grad_inputs(model)
    assert any(W is p for p in model.shared_parameters()) and W is not encoder.embedding.weight


# -- (d) resume ---------------------------------------------------------------------------------------
def test_state_survives_a_state_dict_round_trip():
    def step(g, losses):
        grads = torch.tensor([[1.0, 2.0], [0.5, 0.0]]) * losses[:, None]
        g.backward(losses.clone().requires_grad_(), grads, [], lambda total, exclude=(): total.backward())

    g = gradnorm(initial_loss_steps=3)
    assert list(g.parameters()) == []  # w is a buffer: the main optimizer (and its weight decay) never sees it
    for losses in ([1.0, 2.0], [0.8, 1.9], [0.7, 1.5]):
        step(g, torch.tensor(losses))
    state = g.state_dict()
    assert set(state) == {"w", "_extra_state"}
    resumed = gradnorm(initial_loss_steps=3)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.w, g.w) and torch.equal(resumed.initial_losses, g.initial_losses)
    for losses in ([0.5, 1.2], [0.4, 1.1]):  # Adam's moments and L(0) carry over: identical trajectories
        step(g, torch.tensor(losses))
        step(resumed, torch.tensor(losses))
        assert torch.equal(resumed.w, g.w)
    fresh = gradnorm(initial_loss_steps=3)
    fresh.load_state_dict({"w": state["w"], "_extra_state": gradnorm().get_extra_state()})
    step(fresh, torch.tensor([0.5, 1.2]))
    assert not torch.equal(fresh.w, resumed.w)  # without the extra state the trajectory differs
    with pytest.raises(ConfigError, match="loss.optimizer=adam"):
        gradnorm(optimizer=SGD).load_state_dict(state)


def test_moving_the_module_keeps_the_weight_optimizer_state():
    """``.to(device/dtype)`` replaces the buffer w; its optimizer is rebuilt around the new tensor, state kept."""
    moved, kept = gradnorm(), gradnorm()
    for i, losses in enumerate(([1.0, 2.0], [0.8, 1.9], [0.7, 1.5])):
        if i == 2:
            moved.double()
        grads = torch.tensor([[1.0, 2.0], [0.5, 0.0]]) * torch.tensor(losses)[:, None] ** 2
        for g in (moved, kept):
            g.backward(torch.tensor(losses, requires_grad=True), grads, [], lambda total, exclude=(): total.backward())
    assert moved.w.dtype == torch.float64
    assert torch.allclose(moved.w.float(), kept.w, atol=1e-6)


# -- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"alpha": -0.5}, "loss.alpha"),
        ({"alpha": float("nan")}, "loss.alpha"),
        ({"optimizer": functools.partial(torch.optim.Adam, lr=0.0)}, r"loss.optimizer.lr .*, got 0.0"),
        ({"optimizer": functools.partial(torch.optim.SGD, lr=-1.0)}, r"loss.optimizer.lr .*, got -1.0"),
        ({"initial_loss_steps": 0}, "loss.initial_loss_steps"),
        ({"initial_loss_steps": 1.5}, "loss.initial_loss_steps"),
        ({"optimizer": "rmsprop"}, "loss.optimizer must be an optimizer, got 'rmsprop'"),
        ({"optimizer": len}, "loss.optimizer must be an optimizer"),
        ({"optimizer": functools.partial(torch.optim.Adam, betas=2.0)}, "loss.optimizer could not be built"),
        ({"layer": ""}, "loss.layer"),
    ],
)
def test_bad_options_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        GradNorm(**override)


def test_the_optimizer_is_a_hydra_partial_adam_lr_0025_by_default():
    """conf/loss/gradnorm.yaml's default is Adam(lr=0.025) (what the old ``optimizer: adam``, ``lr: 0.025`` built);
    any torch.optim class fits, with its options under ``loss.optimizer``."""
    g = gradnorm()
    assert (g.optimizer_name, g.lr) == ("adam", 0.025)
    assert (GradNorm().optimizer_name, GradNorm().lr) == ("adam", 0.025)  # the class default is the YAML's
    cfg = compose_cfg(["loss=gradnorm", "loss.optimizer._target_=torch.optim.SGD", "loss.optimizer.lr=0.5"])
    GlobalHydra.instance().clear()
    sgd = instantiate(cfg.loss, _convert_="all")
    assert (sgd.optimizer_name, sgd.lr) == ("sgd", 0.5)


def test_extreme_loss_ratios_stay_finite_in_float32():
    """Issue 14 (found by the property tests): losses 1e30 after 1e-30 overflowed float32's L/L(0) (1e60) and
    ||∇_W L||² (1e60), making w NaN. L(0) = (1e-30, 1e30, 1), L = (1e30, 1e-30, 1): L̃ = (1e60, 1e-60, 1),
    r = L̃/mean(L̃) = (3, 3e-120, 3e-60), i.e. (3, 0, 0) in float32."""
    g = gradnorm(build_tasks({k: {"kind": "regression"} for k in "abc"}))
    theta = torch.ones(3, requires_grad=True)
    for values in ([1e-30, 1e30, 1.0], [1e30, 1e-30, 1.0]):
        v = torch.tensor(values)
        g.backward(v * theta, torch.diag(v), [theta], lambda total, exclude=(): total.backward())
        assert torch.isfinite(g.w).all()
    rate = g.log_values()
    assert [float(rate[f"gradnorm/inverse_rate/{k}"]) for k in "abc"] == pytest.approx([3.0, 0.0, 0.0])
