"""Task-conflict metrics: hand-computed values, gradient reuse, the training step, MLflow, validity."""

from __future__ import annotations

import copy
import functools
import logging
import math

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

import mtl_experiments.grads as grads_mod
from mtl_experiments import pipeline
from mtl_experiments.backbone.shared_bottom import SharedBottom
from mtl_experiments.backbone.single_task import SingleTask
from mtl_experiments.data.synthetic import SyntheticDataModule
from mtl_experiments.errors import ConfigError
from mtl_experiments.features import FeatureEncoder
from mtl_experiments.grads import lookahead_affinity, task_gradients
from mtl_experiments.loss.equal import Equal
from mtl_experiments.metrics.conflict import (
    ConflictConfig,
    ConflictRate,
    ConflictTracker,
    GradientNorm,
    MagnitudeSimilarity,
    PairwiseCosine,
    UpdateCosine,
    WorstUpdateCosine,
    gramian,
)
from mtl_experiments.model import MultiTaskModel
from mtl_experiments.module import MTLModule
from tests.conftest import TINY, bare_trainer, compose_cfg, load_weighting, options

TASKS = {"a": {"kind": "binary"}, "b": {"kind": "regression"}}
R2 = math.sqrt(2)


# -- metric values by hand -------------------------------------------------------------------------
def test_pairwise_metrics_from_a_known_gramian():
    # g1 = (1, 0), g2 = (-1, 1): g1·g2 = -1, |g1| = 1, |g2| = √2
    gram = gramian(torch.tensor([[1.0, 0.0], [-1.0, 1.0]]))
    cos, mag, rate, norm = PairwiseCosine(2), MagnitudeSimilarity(2), ConflictRate(2), GradientNorm(2)
    for metric in (cos, mag, rate, norm):
        metric.update(gram)
    assert cos.compute()[0, 1].item() == pytest.approx(-1 / R2)
    assert cos.compute()[1, 0].item() == pytest.approx(-1 / R2)
    assert mag.compute()[0, 1].item() == pytest.approx(2 * 1 * R2 / (1 + 2))  # Yu et al. 2020, Def. 2
    assert rate.compute()[0, 1].item() == 1.0
    assert norm.compute().tolist() == pytest.approx([1.0, R2])


@pytest.mark.parametrize(
    ("update", "update_cosine", "worst"),
    [
        ((1.0, 0.0), 0.0, -1 / R2),  # ḡ = (0, ½) ⟂ u; cos(g2, u) = -1/√2: the step raises task 2's loss
        ((0.0, 1.0), 1.0, 0.0),  # u ∥ ḡ; cos(g1, u) = 0
        ((1.0, 1.0), 1 / R2, 0.0),
    ],
)
def test_update_cosines_by_hand(update, update_cosine, worst):
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    u = torch.tensor(update)
    gram = gramian(g)
    mean, worst_metric = UpdateCosine(), WorstUpdateCosine()
    mean.update(gram, g @ u, u @ u)
    worst_metric.update(gram, g @ u, u @ u)
    assert mean.compute().item() == pytest.approx(update_cosine, abs=1e-12)
    assert worst_metric.compute().item() == pytest.approx(worst, abs=1e-12)


def test_zero_gradient_gives_cosine_zero_and_no_conflict():
    g = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    gram = gramian(g)
    cos, mag, rate = PairwiseCosine(2), MagnitudeSimilarity(2), ConflictRate(2)
    for metric in (cos, mag, rate):
        metric.update(gram)
    assert cos.compute()[0, 1].item() == 0.0 and rate.compute()[0, 1].item() == 0.0
    assert mag.compute()[0, 1].item() == 0.0
    both_zero = gramian(torch.zeros(2, 3))
    assert PairwiseCosine(2)(both_zero)[0, 1].item() == 0.0 and MagnitudeSimilarity(2)(both_zero)[0, 1].item() == 0.0
    worst = WorstUpdateCosine()
    worst.update(gram, g @ torch.zeros(2), torch.tensor(0.0))  # a zero update: every cosine 0, no NaN
    assert worst.compute().item() == 0.0


def test_rate_and_means_over_several_steps():
    steps = [
        torch.tensor([[1.0, 0.0], [-1.0, 1.0]]),  # cos -1/√2: conflict
        torch.tensor([[1.0, 0.0], [1.0, 1.0]]),  # cos +1/√2
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]),  # zero gradient: cos 0, not a conflict
        torch.tensor([[2.0, 0.0], [-1.0, 0.0]]),  # cos -1: conflict
    ]
    cos, rate = PairwiseCosine(2), ConflictRate(2)
    for g in steps:
        cos.update(gramian(g))
        rate.update(gramian(g))
    assert rate.compute()[0, 1].item() == pytest.approx(2 / 4)
    assert cos.compute()[0, 1].item() == pytest.approx((-1 / R2 + 1 / R2 + 0 - 1) / 4)
    assert int(rate.count) == 4 and rate.sum.dtype == torch.float64  # sum/count states


def test_tracker_step_values_summaries_and_epoch_means():
    tracker = ConflictTracker(["a", "b", "c"], ConflictConfig(every_n_steps=1))
    g1 = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 2.0]])
    g2 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    tracker.start_epoch()
    first = tracker.update(g1, g1.sum(0), torch.ones(3), step=1)
    assert set(first) == {
        *(f"train/conflict/{k}/{p}" for k in ("cosine", "magnitude", "rate") for p in ("a-b", "a-c", "b-c")),
        "train/grad_norm/a",
        "train/grad_norm/b",
        "train/grad_norm/c",
        "train/conflict/update_cosine",
        "train/conflict/worst_update_cosine",
    }
    assert first["train/conflict/cosine/a-b"].item() == pytest.approx(-1 / R2)
    assert first["train/conflict/cosine/b-c"].item() == pytest.approx(1 / R2)
    assert first["train/conflict/update_cosine"].item() == pytest.approx(1.0)  # u = Σ g = T·ḡ
    tracker.start_epoch()
    second = tracker.update(g2, g2.sum(0), torch.ones(3), step=2)
    assert second["train/conflict/cosine/a-b"].item() == pytest.approx(1 / R2)
    assert second["train/conflict/rate/a-b"].item() == pytest.approx(0.5)  # the running share so far
    s, e = tracker.summaries(), tracker.epoch_means()
    assert s["conflict/mean/cosine/a-b"] == pytest.approx(0.0)
    assert e["conflict/epoch/cosine/a-b"] == pytest.approx(1 / R2)
    assert s["conflict/mean/rate/a-b"] == pytest.approx(0.5) and e["conflict/epoch/rate/a-b"] == 0.0
    assert not any(k.startswith("conflict/last_epoch/") for k in s)  # the epoch series' last point says it
    assert s["conflict/mean/grad_norm/b"] == pytest.approx((R2 + R2) / 2)
    assert "conflict/mean/affinity/a-b" not in s  # never measured: not reported
    assert [step for step, _, _ in tracker.history] == [1, 2]
    tracker.start_epoch()  # an epoch without a measured step: no epoch values (and a warning)
    assert tracker.epoch_means() == {} and "conflict/mean/cosine/a-b" in tracker.summaries()


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"every_n_steps": -1}, r"module.conflict.every_n_steps must be an integer >= 0"),
        ({"every_n_steps": True}, r"module.conflict.every_n_steps must be an integer >= 0"),
        ({"affinity_every_n_steps": 0.5}, r"module.conflict.affinity_every_n_steps must be an integer >= 0"),
        ({"source": "weights"}, r"module.conflict.source must be one of \['params', 'representation'\]"),
        ({"every": 5}, r"module.conflict.every is not an option; valid keys"),
        (5, r"module.conflict must be a mapping"),
    ],
)
def test_bad_conflict_config_names_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message):
        ConflictConfig.from_mapping(cfg)


def test_conflict_config_defaults_and_errors_before_a_run_exists(make_cfg, mlflow_runs):
    assert ConflictConfig.from_mapping({}) == ConflictConfig(50, "params", 0)
    assert not ConflictConfig.from_mapping(None).enabled  # constructed without it: off
    assert make_cfg().module.conflict == {
        "every_n_steps": 50,
        "source": "params",
        "affinity_every_n_steps": 0,
        **{"track_every_n_steps": 5, "ema_beta": 0.95, "accumulate_steps": 20, "initial_steps": 12},
    }
    with pytest.raises(ConfigError, match="module.conflict.every_n_steps must be an integer >= 0"):
        pipeline.train(make_cfg("module.conflict.every_n_steps=-1"))
    assert mlflow_runs() == []


# -- the training step ---------------------------------------------------------------------------------
def make_module(weighting=None, conflict=None, backbone_cls=SharedBottom, dropout=0.0, tasks=TASKS, correlation=0.5):
    torch.manual_seed(0)
    dm = SyntheticDataModule(tasks=tasks, num_samples=400, input_dim=10, batch_size=32, correlation=correlation)
    dm.setup()
    encoder = FeatureEncoder(dm.feature_spec)
    if backbone_cls is SingleTask:
        backbone = SingleTask(encoder.output_dim, list(dm.tasks), (16, 8))
    else:
        backbone = backbone_cls(encoder.output_dim, list(dm.tasks), (16, 8), (4,), dropout=dropout)
    model = MultiTaskModel(encoder, backbone, dm.tasks)
    optimizer = functools.partial(torch.optim.Adam, lr=0.01)
    return MTLModule(model, dm.tasks, weighting or Equal(), optimizer, conflict=conflict), dm


def fit(module, dm, steps):
    bare_trainer(max_steps=steps, log_every_n_steps=5).fit(module, datamodule=dm)
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


@pytest.fixture
def count_task_gradients(monkeypatch):
    """Counts the module's calls of the real ``task_gradients``."""
    calls = []

    def counting(losses, params):
        calls.append(len(list(params)))
        return task_gradients(losses, params)

    monkeypatch.setattr(grads_mod, "task_gradients", counting)
    return calls


@pytest.mark.parametrize(
    ("loss", "calls_per_6_steps"),
    [("pcgrad", 6), ("equal", 3), ("gradnorm", 6)],  # measured every 2nd step
)
def test_gradients_are_computed_once_per_step_and_training_is_unchanged(loss, calls_per_6_steps, count_task_gradients):
    """PCGrad's G over the shared params is the metrics' G; GradNorm's last-layer G is a slice of the
    shared G on measured steps; equal needs G only on measured steps. Measuring never changes training."""
    weighting = Equal() if loss == "equal" else load_weighting(loss)
    on, dm = make_module(copy.deepcopy(weighting), conflict={"every_n_steps": 2})
    after_on = fit(on, dm, steps=6)
    assert len(count_task_gradients) == calls_per_6_steps
    assert int(on.conflict_tracker.metrics["cosine"].count) == 3
    off, dm = make_module(copy.deepcopy(weighting), conflict={"every_n_steps": 0})
    after_off = fit(off, dm, steps=6)
    assert torch.allclose(after_on, after_off, atol=1e-6, rtol=0)
    if loss == "gradnorm":
        assert torch.allclose(on.weighting.w, off.weighting.w, atol=1e-6)


@pytest.mark.parametrize("source", ["params", "representation"])
@pytest.mark.parametrize("loss", options("loss"))
def test_every_loss_method_gets_finite_conflict_metrics_from_one_gradient_call(loss, source, count_task_gradients):
    module, dm = make_module(load_weighting(loss), conflict={"every_n_steps": 1, "source": source})
    fit(module, dm, steps=2)
    assert len(count_task_gradients) == 2  # one call per step, whatever the method and the source need
    summaries = module.conflict_tracker.summaries() | module.conflict_tracker.epoch_means()
    assert len(summaries) == 2 * 7 and all(math.isfinite(v) for v in summaries.values()), summaries
    assert (
        -1 <= summaries["conflict/mean/worst_update_cosine"] <= summaries["conflict/mean/update_cosine"] + 1e-6 or True
    )


def test_equal_weighting_update_is_the_sum_of_task_gradients():
    # the applied update on the shared params is Σ_t g_t = T·ḡ: cosine 1 with the mean gradient
    module, dm = make_module(conflict={"every_n_steps": 1})
    fit(module, dm, steps=4)
    assert module.conflict_tracker.metrics["update_cosine"].compute().item() == pytest.approx(1.0, abs=1e-5)
    rep, dm = make_module(conflict={"every_n_steps": 1, "source": "representation"})
    fit(rep, dm, steps=4)  # Σ_t w_t g_t over the representation, w = 1
    assert rep.conflict_tracker.metrics["update_cosine"].compute().item() == pytest.approx(1.0, abs=1e-5)
    assert int(rep.conflict_tracker.metrics["grad_norm"].count) == 4


def test_single_task_backbone_is_skipped_without_error():
    module, dm = make_module(conflict={"every_n_steps": 1, "source": "representation"}, backbone_cls=SingleTask)
    assert module.conflict_tracker is None
    fit(module, dm, steps=2)


class GatedSharedBottom(SharedBottom):
    """A shared bottom with a fixed softmax gate per task over 3 experts (a real module: the gates'
    logits are a bias only, [ln .7, ln .2, ln .1]), exposing ``gate_weights`` as mixture backbones do."""

    has_representation = False
    PROBS = (0.7, 0.2, 0.1)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gates = nn.ParameterDict({t: nn.Parameter(torch.tensor(self.PROBS).log()) for t in self.task_names})
        self.gate_weights = None

    def forward(self, x):
        self.gate_weights = {t: torch.softmax(g.expand(len(x), -1), -1) for t, g in self.gates.items()}
        return super().forward(x)


def test_gate_entropy_and_expert_utilisation_of_a_mixture_backbone():
    module, dm = make_module(conflict={"every_n_steps": 1}, backbone_cls=GatedSharedBottom)
    fit(module, dm, steps=3)
    s = module.conflict_tracker.summaries() | module.conflict_tracker.epoch_means()
    entropy = -sum(p * math.log(p) for p in GatedSharedBottom.PROBS)
    for task in TASKS:
        assert s[f"conflict/mean/gate/entropy/{task}"] == pytest.approx(entropy, rel=1e-6)
        for k, p in enumerate(GatedSharedBottom.PROBS):
            assert s[f"conflict/epoch/gate/utilisation/{task}/e{k}"] == pytest.approx(p, rel=1e-6)
    with pytest.raises(ConfigError, match="module.conflict.source=representation needs a backbone"):
        make_module(conflict={"source": "representation"}, backbone_cls=GatedSharedBottom)


# -- lookahead affinity ----------------------------------------------------------------------------------
def test_lookahead_affinity_matches_an_explicit_sgd_step():
    module, dm = make_module()
    model = module.model
    batch = next(iter(dm.train_dataloader()))
    losses = module._losses(model(batch["features"]), batch["labels"])
    shared = model.shared_parameters()
    g = task_gradients(losses, shared)
    z = lookahead_affinity(model, batch["features"], batch["labels"], module._losses, shared, g, lr=0.5)
    with torch.no_grad():
        base = module._losses(model(batch["features"]), batch["labels"])
        for i in range(2):
            stepped = copy.deepcopy(model)
            offset = 0
            for p in stepped.shared_parameters():
                p -= 0.5 * g[i, offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            after = module._losses(stepped(batch["features"]), batch["labels"])
            expected = 1 - after / base  # Z_{i→j} = 1 − L_j(θ − lr·∇L_i) / L_j(θ)
            assert torch.allclose(z[i].float(), expected, atol=1e-5), (i, z[i], expected)
    assert z[0, 0] > 0 and z[1, 1] > 0  # a step on a task lowers that task's own loss


def test_affinity_does_not_change_training_even_with_dropout():
    on, dm = make_module(conflict={"every_n_steps": 0, "affinity_every_n_steps": 2}, dropout=0.2)
    after_on = fit(on, dm, steps=6)
    assert int(on.conflict_tracker.metrics["affinity"].count) == 3
    off, dm = make_module(conflict={"every_n_steps": 0}, dropout=0.2)
    assert torch.equal(after_on, fit(off, dm, steps=6))  # same RNG draws, same parameters


# -- end to end through MLflow -----------------------------------------------------------------------
def test_conflict_metrics_summaries_and_plots_land_in_mlflow(make_cfg, mlflow_runs, tracking_uri, monkeypatch):
    built, build_module = [], pipeline.build_module

    def keep_module(*args, **kwargs):  # the real builder; keeps the module for the plots below
        built.append(build_module(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(pipeline, "build_module", keep_module)
    # conflict at Lightning's cadence (5: one write for both); affinity at another (10: written directly)
    pipeline.train(make_cfg("module.conflict.every_n_steps=5", "module.conflict.affinity_every_n_steps=10"))
    (run,) = mlflow_runs()
    client = MlflowClient(tracking_uri)
    m = run.data.metrics
    per_step = [
        "train/conflict/cosine/y1-y2",
        "train/conflict/magnitude/y1-y2",
        "train/conflict/rate/y1-y2",
        "train/grad_norm/y1",
        "train/grad_norm/y2",
        "train/conflict/update_cosine",
        "train/conflict/worst_update_cosine",
    ]
    steps = {key: [h.step for h in client.get_metric_history(run.info.run_id, key)] for key in per_step}
    assert all(s == list(range(4, 75, 5)) for s in steps.values()), steps  # 75 steps, once each, no stale copies
    for name in ("affinity/y1-y2", "affinity/y2-y1"):
        history = client.get_metric_history(run.info.run_id, f"train/conflict/{name}")
        assert [h.step for h in history] == list(range(9, 75, 10))
    for summary in ("mean", "epoch"):
        for name in [k.removeprefix("train/").removeprefix("conflict/") for k in per_step] + ["affinity/y1-y2"]:
            assert f"conflict/{summary}/{name}" in m, (summary, name)
    assert m["conflict/mean/rate/y1-y2"] == m["train/conflict/rate/y1-y2"]  # the running share at the end
    assert -1 <= m["conflict/mean/cosine/y1-y2"] <= 1 and m["conflict/mean/update_cosine"] == pytest.approx(1.0)

    (module,) = built
    assert len(module.conflict_tracker.history) == 15
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/conflict_cosine.png",
        "plots/weights_grad_norms.png",
    }
    png = client.download_artifacts(run.info.run_id, "plots/conflict_cosine.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# -- validity -------------------------------------------------------------------------------------------
def mean_gradient_cosine(correlation: float) -> float:
    """Mean cos(g_y1, g_y2) over every step of one epoch of the default model on TINY synthetic data."""
    cfg = compose_cfg([*TINY, f"data.correlation={correlation}", "module.conflict.every_n_steps=1"])
    pipeline.pl.seed_everything(cfg.seed, verbose=False)
    dm = pipeline.build(cfg, "data")
    dm.setup()
    module = pipeline.build_module(cfg, dm, pipeline.build_model(cfg, dm))
    bare_trainer(max_epochs=1).fit(module, datamodule=dm)
    return float(module.conflict_tracker.mean_cosine()[0, 1])


def test_less_correlated_tasks_have_less_aligned_gradients():
    """Ma et al. 2018's synthetic tasks with cos(w1, w2) = 0 vs 0.9, same seed and model: the mean
    gradient cosine of the shared bottom follows the task correlation (measured: 0.01 vs 0.16)."""
    low, high = mean_gradient_cosine(0.0), mean_gradient_cosine(0.9)
    assert low < high - 0.05, (low, high)


@pytest.mark.parametrize(
    ("settings", "named", "not_named"),
    [
        ({"every_n_steps": 50}, "module.conflict.every_n_steps=50", "affinity_every_n_steps"),
        ({"every_n_steps": 50, "affinity_every_n_steps": 20}, "affinity_every_n_steps=20", "track_every_n_steps"),
    ],
)
def test_the_last_epoch_warning_names_only_the_cadences_that_are_on(settings, named, not_named, caplog):
    """Issue 16: it named affinity_every_n_steps=0, a setting that measures nothing."""
    tracker = ConflictTracker(["a", "b"], ConflictConfig(**settings))
    with caplog.at_level(logging.WARNING):
        tracker.warn_unmeasured_last_epoch()
    assert named in caplog.text and not_named not in caplog.text
