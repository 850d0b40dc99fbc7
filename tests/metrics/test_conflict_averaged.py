"""The low-noise conflict estimators (ema_cosine, accumulated_cosine, layer_cosine): by hand, their defining
properties on random inputs (float32 and float64), the tracker's names and state, the training step."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.errors import ConfigError
from mtl_experiments.grads import shared_layers
from mtl_experiments.metrics.conflict import ConflictConfig, ConflictTracker, gramian, pairwise_cosine
from mtl_experiments.metrics.conflict_averaged import GradientAverages, batched_cosine
from tests.metrics.test_conflict import count_task_gradients, fit, make_module  # noqa: F401 (a fixture)

R5 = math.sqrt(5)


# -- by hand ------------------------------------------------------------------------------------------
def test_estimators_by_hand():
    """Two steps, β = ½, blocks of 2: m₁ = ½g¹ = [[½, 0], [0, ½]], m₂ = ½m₁ + ½g² = [[¾, 0], [½, ¼]]:
    cos = (3/8) / (¾ · √5/4) = 2/√5; Σg = [[2, 0], [1, 1]]: cos = 2 / (2√2); per layer (one column each) of m₂:
    cos((¾), (½)) = 1 and cos((0), (¼)) = 0 (a zero gradient's cosine is 0)."""
    averages = GradientAverages(beta=0.5, accumulate_steps=2, layers=[("l0", 1), ("l1", 1)])
    ema, layers, block = averages.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert pairwise_cosine(ema)[0, 1].item() == 0.0 and block is None  # the first block is not complete yet
    ema, layers, block = averages.update(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert averages.ema.tolist() == [[0.75, 0.0], [0.5, 0.25]]
    assert pairwise_cosine(ema)[0, 1].item() == pytest.approx(2 / R5, abs=1e-7)
    assert pairwise_cosine(block)[0, 1].item() == pytest.approx(1 / math.sqrt(2), abs=1e-7)
    assert batched_cosine(layers)[:, 0, 1].tolist() == pytest.approx([1.0, 0.0])
    assert averages.block_steps == 0  # the next step starts a new block


def test_shared_layers_name_the_owning_modules():
    module, _ = make_module(conflict={"every_n_steps": 1})
    layers = shared_layers(module.model, module.model.shared_parameters())
    assert [name for name, _ in layers] == ["bottom.0", "bottom.0", "bottom.2", "bottom.2"]
    assert sum(width for _, width in layers) == sum(p.numel() for p in module.model.shared_parameters())


# -- defining properties on random inputs -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(10))
def test_averages_are_the_weighted_sums_they_define(seed, dtype):
    """m_n = Σ_k β^(n−k) (1 − β) g_k; the block sum is Σ g_k over its k steps; β = 0 is the per-step cosine;
    the per-layer Gramians add up to the whole one; cosines are symmetric, in [-1, 1], invariant to scale."""
    gen = torch.Generator().manual_seed(seed)
    t, p, n = int(torch.randint(2, 5, (1,), generator=gen)), int(torch.randint(3, 40, (1,), generator=gen)), 6
    beta = float(torch.rand((), generator=gen)) * 0.99
    steps = [
        torch.randn(t, p, generator=gen, dtype=dtype) * 10 ** float(torch.randn((), generator=gen)) for _ in range(n)
    ]
    cut = int(torch.randint(1, p, (1,), generator=gen))
    averages, per_step = GradientAverages(beta, n, [("a", cut), ("b", p - cut)]), GradientAverages(0.0, 1)
    for g in steps:
        ema, layers, block = averages.update(g)
        assert torch.allclose(pairwise_cosine(per_step.update(g)[0]), pairwise_cosine(gramian(g)), atol=1e-5)
    expected = sum(beta ** (n - 1 - k) * (1 - beta) * g.double() for k, g in enumerate(steps))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(pairwise_cosine(ema), pairwise_cosine(gramian(expected)), atol=tol)
    assert torch.allclose(pairwise_cosine(block), pairwise_cosine(gramian(sum(steps))), atol=tol)
    assert torch.allclose(layers.sum(0), ema, rtol=1e-5, atol=1e-6 * float(ema.abs().max()))
    cos = batched_cosine(layers)
    assert torch.allclose(cos, cos.transpose(-1, -2), atol=1e-6) and cos.abs().max() <= 1.0
    scaled = GradientAverages(beta, n)
    for g in steps:
        scaled_ema = scaled.update(g * 7.5)[0]
    assert torch.allclose(pairwise_cosine(scaled_ema), pairwise_cosine(ema), atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_averaging_recovers_the_cosine_that_sampling_noise_hides(dtype):
    """The estimators' purpose: g_t = μ_t + noise, noise 3x the signal over P = 1000 coordinates. One step's
    cosine is pulled to ≈ cos(μ1, μ2)/10; the EMA (β = 0.98) and 200-step blocks recover it within 0.1."""
    gen = torch.Generator().manual_seed(0)
    p = 1000
    mu1 = torch.randn(p, generator=gen, dtype=dtype)
    mu2 = 0.6 * mu1 + 0.8 * torch.randn(p, generator=gen, dtype=dtype)  # cos(μ1, μ2) ≈ 0.6
    true = float(pairwise_cosine(gramian(torch.stack([mu1, mu2])))[0, 1])
    averages, per_step = GradientAverages(0.98, 200), []
    for _ in range(200):
        g = torch.stack([mu1, mu2]) + 3.0 * torch.randn(2, p, generator=gen, dtype=dtype)
        ema, _, block = averages.update(g)
        per_step.append(float(pairwise_cosine(gramian(g))[0, 1]))
    assert sum(per_step) / len(per_step) < true / 5
    assert float(pairwise_cosine(ema)[0, 1]) == pytest.approx(true, abs=0.1)
    assert float(pairwise_cosine(block)[0, 1]) == pytest.approx(true, abs=0.05)


# -- the tracker --------------------------------------------------------------------------------------------
def tracked_steps(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 5, generator=gen) for _ in range(n)]


def tracker_with_estimators() -> ConflictTracker:
    config = ConflictConfig(every_n_steps=2, track_every_n_steps=1, ema_beta=0.5, accumulate_steps=2)
    return ConflictTracker(["a", "b", "c"], config, [("l0", 2), ("l1", 3)])


def test_tracker_names_summaries_step_values_and_epoch_series():
    tracker = tracker_with_estimators()
    tracker.start_epoch()
    for g in tracked_steps(3):
        tracker.track(g)
    values = tracker.update(g, g.sum(0), torch.ones(3), step=2)
    assert values["train/conflict/ema_cosine/a-c"] == tracker.metrics["ema_cosine"].last[0, 2]
    assert "train/conflict/accumulated_cosine/b-c" in values  # the last complete block's value
    s = tracker.summaries()
    pairs = ("a-b", "a-c", "b-c")
    assert {f"conflict/mean/{k}/{p}" for k in ("ema_cosine", "accumulated_cosine") for p in pairs} <= set(s)
    assert {f"conflict/mean/layer_cosine/{layer}/{p}" for layer in ("l0", "l1") for p in pairs} <= set(s)
    ema = torch.zeros(3, 5)
    cosines = []
    for g in tracked_steps(3):
        ema = 0.5 * ema + 0.5 * g
        cosines.append(float(pairwise_cosine(gramian(ema))[1, 2]))
    assert s["conflict/mean/ema_cosine/b-c"] == pytest.approx(sum(cosines) / 3, abs=1e-6)
    assert int(tracker.metrics["accumulated_cosine"].count) == 1  # one complete block of 2
    epoch = tracker.epoch_means()
    assert epoch["conflict/epoch/ema_cosine/b-c"] == pytest.approx(s["conflict/mean/ema_cosine/b-c"])
    tracker.start_epoch()
    tracker.track(tracked_steps(1, seed=1)[0])
    assert set(tracker.epoch_means()) == {
        f"conflict/epoch/{k}"
        for k in [
            *(f"{e}/{p}" for e in ("ema_cosine", "accumulated_cosine", "initial_cosine") for p in pairs),
            *(f"layer_cosine/l{i}/{p}" for i in (0, 1) for p in pairs),
        ]
    }


def test_tracker_state_survives_a_checkpoint_mid_block():
    """A tracker restored from ``state_dict`` after 3 steps (in the middle of a block) continues exactly as the
    uninterrupted one: the EMA, the block sum and its count are checkpointed with the metrics' states."""
    steps = tracked_steps(5)
    whole, first = tracker_with_estimators(), tracker_with_estimators()
    for g in steps:
        whole.track(g)
    for g in steps[:3]:
        first.track(g)
    state = first.state_dict()
    resumed = tracker_with_estimators()
    resumed.load_state_dict(state)
    for g in steps[3:]:
        resumed.track(g)
    assert resumed.summaries() == pytest.approx(whole.summaries(), abs=1e-12)
    assert torch.equal(resumed.averages.ema, whole.averages.ema) and resumed.averages.block_steps == 1


def test_initial_cosine_averages_the_first_tracked_steps_only():
    config = ConflictConfig(track_every_n_steps=1, ema_beta=0.5, initial_steps=2)
    tracker = ConflictTracker(["a", "b", "c"], config)
    cosines = []
    for g in tracked_steps(4):
        tracker.track(g)
        cosines.append(tracker.metrics["ema_cosine"].last[0, 1].item())
    assert int(tracker.metrics["initial_cosine"].count) == 2
    assert tracker.summaries()["conflict/mean/initial_cosine/a-b"] == pytest.approx(sum(cosines[:2]) / 2, abs=1e-9)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"ema_beta": 1.0}, r"module.conflict.ema_beta must be a number in \[0, 1\)"),
        ({"ema_beta": -0.1}, r"module.conflict.ema_beta must be"),
        ({"accumulate_steps": 0}, r"module.conflict.accumulate_steps must be an integer >= 1"),
        ({"initial_steps": 0}, r"module.conflict.initial_steps must be an integer >= 1"),
        ({"track_every_n_steps": -5}, r"module.conflict.track_every_n_steps must be an integer >= 0"),
    ],
)
def test_bad_estimator_config_names_the_key(cfg, message):
    with pytest.raises(ConfigError, match=message):
        ConflictConfig.from_mapping(cfg)


# -- the training step ---------------------------------------------------------------------------------------
def test_tracking_reuses_one_gradient_call_per_step_and_never_changes_training(count_task_gradients):  # noqa: F811
    """Tracked every 2nd step and measured every 3rd: steps 2, 3, 4, 6 need G, each one call (step 6 both);
    the parameters after 6 steps are those of a run that measures nothing."""
    cfg = {"every_n_steps": 3, "track_every_n_steps": 2, "accumulate_steps": 2}
    on, dm = make_module(conflict=cfg)
    after_on = fit(on, dm, steps=6)
    assert len(count_task_gradients) == 4
    tracker = on.conflict_tracker
    assert int(tracker.metrics["ema_cosine"].count) == 3 and int(tracker.metrics["accumulated_cosine"].count) == 1
    assert tracker.averages.ema.shape == (2, sum(p.numel() for p in on.model.shared_parameters()))
    off, dm = make_module(conflict={"every_n_steps": 0})
    assert torch.allclose(after_on, fit(off, dm, steps=6), atol=1e-6, rtol=0)


def test_after_the_initial_window_tracking_rides_on_the_measured_steps(count_task_gradients):  # noqa: F811
    """Tracked every step until initial_cosine has its 2 values (steps 1, 2), then only on the measured steps
    (3, 6), whose G is computed anyway: 4 gradient calls in 6 steps, 4 tracked steps."""
    module, dm = make_module(conflict={"every_n_steps": 3, "track_every_n_steps": 1, "initial_steps": 2})
    fit(module, dm, steps=6)
    assert len(count_task_gradients) == 4
    tracker = module.conflict_tracker
    assert int(tracker.metrics["ema_cosine"].count) == 4 and int(tracker.metrics["initial_cosine"].count) == 2
