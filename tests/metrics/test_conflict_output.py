"""The function-space conflict estimators (output_cosine, initial_output_cosine): by hand, their defining property
(the parameter-space cosine of a shared head whose Jacobian has orthonormal rows) on random inputs in float32 and
float64, scale invariance, symmetry, label masks, skipped pairs, and the training step."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_experiments.metrics.conflict import ConflictConfig, ConflictTracker, gramian, pairwise_cosine
from mtl_experiments.metrics.conflict_output import output_cosine, output_residuals
from mtl_experiments.tasks.binary import BinaryTask
from mtl_experiments.tasks.multiclass import MulticlassTask
from mtl_experiments.tasks.regression import RegressionTask
from tests.metrics.test_conflict import fit, make_module

TASKS = {"a": BinaryTask("a"), "b": BinaryTask("b")}


def cos_ab(outputs, labels, masks=None, tasks=TASKS):
    d, m, _ = output_residuals(tasks, outputs, labels, masks or {})
    return output_cosine(d, m)[0, 1].item()


# -- by hand ------------------------------------------------------------------------------------------
def test_output_cosine_by_hand():
    """Logits 0 (σ = ½): δ_a ∝ ½ − y_a. y_a = (1, 1, 0, 0), y_b = (1, 1, 1, 0): δ_a ∝ (−½, −½, ½, ½),
    δ_b ∝ (−½, −½, −½, ½), cos = (¼ + ¼ − ¼ + ¼) / 1 = ½; y_b = (1, 0, 1, 0): cos = 0; with b's last row
    unlabelled, rows 0–2 only: (¼ + ¼ − ¼) / (√¾ √¾) = ⅓ (a's residual on row 3 does not count)."""
    z = torch.zeros(4, 1)
    outputs = {"a": z, "b": z}
    ya, yb = torch.tensor([1.0, 1, 0, 0]), torch.tensor([1.0, 1, 1, 0])
    assert cos_ab(outputs, {"a": ya, "b": yb}) == pytest.approx(0.5, abs=1e-12)
    assert cos_ab(outputs, {"a": ya, "b": torch.tensor([1.0, 0, 1, 0])}) == pytest.approx(0.0, abs=1e-12)
    masks = {"b": torch.tensor([True, True, True, False])}
    assert cos_ab(outputs, {"a": ya, "b": yb}, masks) == pytest.approx(1 / 3, abs=1e-7)
    d, _, _ = output_residuals(TASKS, outputs, {"a": ya, "b": yb}, masks)
    assert d[1].tolist() == pytest.approx([-0.5, -0.5, -0.5, 0.0])  # per row σ(z) − y (n·(σ − y)/n), 0 unlabelled


@pytest.mark.parametrize("seed", range(6))
def test_residuals_of_two_shards_concatenated_give_the_whole_batch_cosine(seed):
    """What DDP gathers: each rank's per-row residuals, the two ranks' labelled counts differing, concatenated,
    give the cosine one process computes on the whole batch (the 1/n of each rank's mean is multiplied back)."""
    gen = torch.Generator().manual_seed(seed)
    outputs = {"a": torch.randn(16, 1, generator=gen), "b": torch.randn(16, 1, generator=gen)}
    labels = {"a": torch.randint(0, 2, (16,), generator=gen).float(), "b": torch.randn(16, generator=gen)}
    masks = {"b": torch.rand(16, generator=gen) < 0.5}
    masks["b"][[0, 8]] = True  # a labelled row on each shard
    tasks = {"a": BinaryTask("a"), "b": RegressionTask("b")}
    whole = output_residuals(tasks, outputs, labels, masks)
    halves = [
        output_residuals(tasks, *({k: v[rows] for k, v in x.items()} for x in (outputs, labels, masks)))
        for rows in (slice(0, 8), slice(8, 16))
    ]
    d, m = torch.cat([h[0] for h in halves], dim=1), torch.cat([h[1] for h in halves], dim=1)
    # float32 residuals: the 1/n and ×n round at float32's precision
    torch.testing.assert_close(output_cosine(d, m), output_cosine(whole[0], whole[1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_a_task_without_mask_gives_exactly_the_residuals_of_an_all_labelled_mask(seed, dtype):
    """The no-mask path (no index copies, the row count known) is the all-true mask's path bit for bit: random
    outputs with tied values, binary and regression tasks."""
    gen = torch.Generator().manual_seed(seed)
    outputs = {n: torch.randint(-3, 4, (32, 1), generator=gen).to(dtype) / 2 for n in ("a", "b")}  # many ties
    labels = {"a": torch.randint(0, 2, (32,), generator=gen).to(dtype), "b": torch.randn(32, generator=gen).to(dtype)}
    tasks = {"a": BinaryTask("a"), "b": RegressionTask("b")}
    everything = {n: torch.ones(32, dtype=torch.bool) for n in tasks}
    for got, want in zip(
        output_residuals(tasks, outputs, labels, {}), output_residuals(tasks, outputs, labels, everything), strict=True
    ):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


def test_no_common_row_and_unlabelled_task_give_zero():
    z, y = torch.zeros(3, 1), torch.tensor([1.0, 0, 1])
    masks = {"a": torch.tensor([True, False, False]), "b": torch.tensor([False, True, True])}
    assert cos_ab({"a": z, "b": z}, {"a": y, "b": y}, masks) == 0.0
    assert cos_ab({"a": z, "b": z}, {"a": y, "b": y}, {"b": torch.zeros(3, dtype=torch.bool)}) == 0.0


# -- the defining property on random inputs --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(12))
def test_equals_the_parameter_cosine_of_a_shared_head_with_orthonormal_jacobian(seed, dtype):
    """ŷ_a = ŷ_b = X θ with X X ᵀ = I (the towers identical, the kernel the identity): g_t = Xᵀ δ_t, so the
    parameter-space cosine of the tasks' losses over the rows labelled for both equals output_cosine; it is
    symmetric, in [-1, 1], 1 on the diagonal and unchanged by a positive scale of either loss."""
    gen = torch.Generator().manual_seed(seed)
    b = int(torch.randint(3, 30, (1,), generator=gen))
    p = b + int(torch.randint(0, 20, (1,), generator=gen))
    x = torch.linalg.qr(torch.randn(p, b, generator=gen, dtype=torch.float64))[0].T.to(dtype)  # [B, P], X Xᵀ = I
    theta = (torch.randn(p, generator=gen, dtype=dtype) * 3).requires_grad_(True)
    tasks = {"a": BinaryTask("a"), "b": RegressionTask("b")}
    labels = {"a": torch.randint(0, 2, (b,), generator=gen).to(dtype), "b": torch.randn(b, generator=gen, dtype=dtype)}
    masks = {t: torch.rand(b, generator=gen) < 0.8 for t in tasks}
    masks["a"][0] = masks["b"][0] = True  # at least one common row
    out = (x @ theta)[:, None]
    both = masks["a"] & masks["b"]
    losses = [tasks[t].loss(out[both], labels[t][both]) for t in tasks]
    g = torch.stack([torch.autograd.grad(loss, theta, retain_graph=True)[0] for loss in losses])
    cos = output_cosine(*output_residuals(tasks, {"a": out, "b": out}, labels, masks)[:2])
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert cos[0, 1].item() == pytest.approx(pairwise_cosine(gramian(g))[0, 1].item(), abs=tol)
    assert (
        torch.equal(cos, cos.T)
        and cos.abs().max() <= 1.0
        and torch.allclose(cos.diagonal(), torch.ones(2, dtype=cos.dtype))
    )

    class Scaled(RegressionTask):
        def loss(self, output, target):
            return 7.5 * super().loss(output, target)

    scaled = output_cosine(
        *output_residuals({"a": tasks["a"], "b": Scaled("b")}, {"a": out, "b": out}, labels, masks)[:2]
    )
    assert scaled[0, 1].item() == pytest.approx(cos[0, 1].item(), abs=tol)


# -- the tracker ----------------------------------------------------------------------------------------------
def test_tracker_skips_pairs_without_one_output_per_sample_and_keeps_the_initial_window():
    """A multiclass task (an output vector per sample) has no function-space cosine with the others: only a-b
    is summarised; initial_output_cosine averages the first 2 tracked steps, output_cosine all 3."""
    tasks = {"a": BinaryTask("a"), "b": RegressionTask("b"), "c": MulticlassTask("c", num_classes=3)}
    tracker = ConflictTracker(list(tasks), ConflictConfig(track_every_n_steps=1, initial_steps=2))
    gen = torch.Generator().manual_seed(0)
    values = []
    for _ in range(3):
        outputs = {"a": torch.randn(8, 1, generator=gen), "b": torch.randn(8, 1, generator=gen)}
        outputs["c"] = torch.randn(8, 3, generator=gen)
        labels = {"a": torch.randint(0, 2, (8,), generator=gen).float(), "b": torch.randn(8, generator=gen)}
        labels["c"] = torch.randint(0, 3, (8,), generator=gen)
        tracker.track_outputs(tasks, outputs, labels, {})
        values.append(cos_ab(outputs, labels, tasks={"a": tasks["a"], "b": tasks["b"]}))
    s = tracker.summaries() | tracker.epoch_means()
    assert {k for k in s if "output_cosine" in k} == {
        f"conflict/{w}/{e}/a-b" for w in ("mean", "epoch") for e in ("output_cosine", "initial_output_cosine")
    }
    assert s["conflict/mean/output_cosine/a-b"] == pytest.approx(sum(values) / 3, abs=1e-9)
    assert s["conflict/mean/initial_output_cosine/a-b"] == pytest.approx(sum(values[:2]) / 2, abs=1e-9)
    assert not math.isnan(s["conflict/mean/output_cosine/a-b"])


def test_training_step_tracks_output_cosine_on_the_tracked_steps():
    """Tracked every step until 2 initial values, then on the measured steps (3): steps 1, 2, 3 in 4 steps; the
    values survive a checkpoint of the tracker."""
    module, dm = make_module(conflict={"every_n_steps": 3, "track_every_n_steps": 1, "initial_steps": 2})
    fit(module, dm, steps=4)
    tracker = module.conflict_tracker
    assert int(tracker.metrics["output_cosine"].count) == 3 and int(tracker.metrics["initial_output_cosine"].count) == 2
    restored = ConflictTracker(tracker.task_names, tracker.config, tracker.averages.layers)
    restored.load_state_dict(tracker.state_dict())
    assert (
        restored.summaries()["conflict/mean/output_cosine/a-b"]
        == tracker.summaries()["conflict/mean/output_cosine/a-b"]
    )
