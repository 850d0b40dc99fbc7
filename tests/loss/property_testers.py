"""Properties a weighting promises, each checked on many random inputs (modelled on TorchJD's
``tests/unit/aggregation/_property_testers.py``).

Gradient aggregators (``GradientAggregation``: ``aggregate(G) -> (update[P], weights[T])``) are checked on random
Jacobians with T = 2..6 tasks and P = T - 1 (fewer parameters than tasks: a singular Gramian) or T + 3
parameters, in float32 and float64, with gradient norms spread over four orders of magnitude, plus the inputs on which
issue 14 found defects. Loss-level methods
(every other weighting) are driven through a few steps and epochs of their hooks with zero and extreme losses.

``PROMISES`` says which method promises which property; a method that does not is listed with the reason in
``EXEMPT``, and a property that fails today because of a known defect is in ``KNOWN_DEFECTS`` (``xfail(strict)``:
the test fails as soon as the defect is fixed, so the entry must go). Every ``conf/loss/*.yaml`` is enrolled by
``tests/loss/test_loss_properties.py``; a new method must appear in ``PROMISES`` or ``EXEMPT`` for each property.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import Tensor

from mtl_experiments.loss.base import GradientAggregation, Weighting
from mtl_experiments.tasks import build_tasks
from tests.conftest import load_weighting

DTYPES = (torch.float32, torch.float64)
SHAPES = [(t, p) for t in range(2, 7) for p in (t - 1, t + 3)]  # parameters below and above the number of tasks
AGGREGATOR_PROPERTIES = (
    "structure",
    "precision",
    "zero",
    "zero_row",
    "identical_rows",
    "opposite_rows",
    "permutation",
    "scaling",
    "cagrad_objective",
    "imtl_projections",
    "config_angles",
)
ONE_DTYPE = {"precision": torch.float32}  # compares float32 with float64 itself
LOSS_PROPERTIES = ("zero_losses", "extreme_losses")

# -- which method promises what --------------------------------------------------------------------------------
# Every aggregator promises finite, well-shaped output on random, zero, partly zero, identical and opposite
# gradients; the rest is per method:
NON_CONFLICTING = {"upgrad", "mgda"}  # ⟨update, g_t⟩ >= 0 for every task
# Nash-MTL's update has α_t·⟨g_t, d⟩ = 1 > 0, when a solution exists: the gradients must not have 0 in their convex
# hull (the paper's assumption), which holds for linearly independent rows, i.e. P >= T here
# ConFIG gives every task the same positive cosine when U·U⁺1 = 1, i.e. for linearly independent rows
NON_CONFLICTING_IF_INDEPENDENT = {"config", "nash_mtl"}
RANDOMISED = {"pcgrad", "gradvac"}  # a random visiting order from the method's own seeded generator
EXEMPT = {
    "permutation": {
        "pcgrad": "projects in a random order of the rows: permuting the rows changes the order",
        "gradvac": "visits the other tasks in a random order (and its targets are per task pair)",
        "metabalance": "the target task (the first row) is singled out: permuting the rows changes the target",
        "fairgrad": "with 0 in the gradients' convex hull (often when T > P) G Gᵀw = w^(-1/α) has no root and the "
        "least-squares best fit depends on the solver's path, which the row order changes",
    },
    "precision": {"graddrop": "draws U in the gradients' dtype: float32 and float64 draws differ"},
    "scaling": {
        "mgda": "the min-norm point of the hull is not linear in the row scales",
        "imtl": "equal projections onto the unit gradients: invariant to the row scales, not linear in them",
        "aligned_mtl": "rescales every principal component to one singular value: not linear in the row scales",
        "cagrad": "the ball's radius c·‖g_0‖ and the dual solution depend on the row scales non-linearly",
        "nash_mtl": "α_t·g_tᵀd = 1 makes the update invariant to the row scales, not linear in them",
        "graddrop": "the sign purity P = ½(1 + Σg/Σ|g|) depends on the row scales",
        "gradvac": "its cosine targets are an EMA over calls: the three calls of the check see different targets",
        "moco": "the weights' projected-gradient step on Y·Yᵀ is not linear in the row scales",
        "sdmgrad": "the dual solution on the simplex (min-norm point pulled towards g_0) depends on the row scales",
        "fairgrad": "w scales as s^(-α/(1+α)) when every row is scaled by s: not linear in the row scales",
        "db_mtl": "every task's gradient is rescaled to the largest norm: not linear in the row scales",
    },
    "cagrad_objective": {"*": "CAGrad's own objective (max_d min_t g_tᵀd in the ball around g_0)"},
    "imtl_projections": {"*": "IMTL-G's own promise: equal projections of the update on every unit gradient"},
    "config_angles": {"*": "ConFIG's own promise: the same angle between the update and every task gradient"},
    "zero_losses": {"gls": "the geometric mean's gradient is undefined at a zero loss: it raises NonFiniteLossError"},
    "extreme_losses": {},
}
# weights that are least-squares reconstructions of the update (loss.base.effective_weights): with an ill-conditioned
# Gramian in float32 they are not accurate enough to compare, so only the update is
EFFECTIVE_WEIGHTS = {"pcgrad", "graddrop", "gradvac", "db_mtl"}
# known defects: (method, property, dtype or None for both) -> reason; each case is xfail(strict=True)
KNOWN_DEFECTS: dict[tuple[str, str, torch.dtype | None], str] = {}


def promises(name: str, prop: str) -> bool:
    exempt = EXEMPT.get(prop, {})
    if "*" in exempt:  # a method-specific property: only that method promises it
        return name == prop.split("_")[0]
    return name not in exempt


# -- inputs ----------------------------------------------------------------------------------------------------
# issue 14's inputs: Aligned-MTL on float32 (two), MGDA with its default tolerance, CAGrad with a zero row
ISSUE_14 = (
    [[1.0, 0.0], [-1000.0, 1.0]],
    [[1.0, 0.0], [0.0, 3000.0]],
    [[-4.0, 4.0, -5.0], [30.0, 20.0, -40.0], [0.0, -300.0, 500.0]],
    [[1.0, 0.0], [0.0, 0.0], [-1.2, 1.0]],
)


@functools.cache
def jacobians(dtype: torch.dtype) -> tuple[Tensor, ...]:
    """One random Jacobian per shape of ``SHAPES`` (Gaussian rows with norms log-uniform in 1e-2..1e2), then
    issue 14's inputs."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for t, p in SHAPES:
        g = torch.randn(t, p, generator=gen, dtype=torch.float64)
        norms = 10 ** (4 * torch.rand(t, 1, generator=gen, dtype=torch.float64) - 2)
        out.append((g / g.norm(dim=1, keepdim=True) * norms).to(dtype))
    return tuple(out) + tuple(torch.tensor(g, dtype=dtype) for g in ISSUE_14)


@functools.cache
def pristine(name: str, num_tasks: int) -> Weighting:
    """``conf/loss/<name>.yaml`` set up for ``num_tasks`` binary tasks, never called (copy it before use)."""
    return load_weighting(name, build_tasks({f"t{i}": {"kind": "binary"} for i in range(num_tasks)}))


def fresh(name: str, num_tasks: int) -> Weighting:
    """A new instance in its initial state (same seed, same draws): cheaper than instantiating the YAML."""
    return copy.deepcopy(pristine(name, num_tasks))


def is_aggregator(name: str) -> bool:
    return isinstance(pristine(name, 2), GradientAggregation)


def aggregate(name: str, g: Tensor) -> tuple[Tensor, Tensor]:
    update, weights = fresh(name, g.shape[0]).aggregate(g)
    return update.detach(), weights.detach()


def tolerance(g: Tensor) -> float:
    """Relative tolerance of a check on ``g``: float32 rounding, or float64's with the solvers' own tolerances."""
    return 1e-3 if g.dtype == torch.float32 else 1e-7


# -- aggregator properties: each returns the descriptions of the cases that break it (empty: it holds) ------------
def check_structure(name: str, dtype: torch.dtype) -> list[str]:
    """Shapes ``[P]`` and ``[T]``, the Jacobian's dtype, finite values; non-conflicting where promised."""
    bad = []
    for g in jacobians(dtype):
        update, weights = aggregate(name, g)
        ok = update.shape == g.shape[1:] and weights.shape == g.shape[:1] and update.dtype == g.dtype
        ok = ok and bool(torch.isfinite(update).all() and torch.isfinite(weights).all())
        independent = g.shape[1] >= g.shape[0] and torch.linalg.matrix_rank(g.double()) == g.shape[0]
        if ok and (name in NON_CONFLICTING or (name in NON_CONFLICTING_IF_INDEPENDENT and independent)):
            ok = conflict_free(g, update)
        if not ok:
            bad.append(f"G{tuple(g.shape)}: update {update.tolist()}, weights {weights.tolist()}")
    return bad


def conflict_free(g: Tensor, update: Tensor) -> bool:
    """cos(update, g_t) >= -tol for every task t (an update that is 0 up to rounding has no direction)."""
    g64, u64 = g.double(), update.double()
    norms = g64.norm(dim=1)
    if u64.norm() <= tolerance(g) * norms.max():
        return True
    return bool((g64 @ u64 >= -tolerance(g) * norms * u64.norm()).all())


def check_special(name: str, dtype: torch.dtype, kind: str) -> list[str]:
    """Finite output on a zero Jacobian (update 0), one zero row, identical rows (the update is a non-negative
    multiple of the row) and opposite rows (non-conflicting methods: no component along them)."""
    bad = []
    for g in special_jacobians(kind, dtype):
        update, weights = aggregate(name, g)
        ok = bool(torch.isfinite(update).all() and torch.isfinite(weights).all())
        if ok and kind == "zero":
            ok = bool((update == 0).all())
        if ok and kind == "identical_rows":
            ok = parallel(update, g[0])
        if ok and kind == "opposite_rows" and name in NON_CONFLICTING:
            ok = bool((g[0].double() @ update.double()).abs() <= tolerance(g) * g[0].double().norm() ** 2)
        if not ok:
            bad.append(f"G{tuple(g.shape)} ({kind}): update {update.tolist()}, weights {weights.tolist()}")
    return bad


def special_jacobians(kind: str, dtype: torch.dtype) -> list[Tensor]:
    out = []
    for g in jacobians(dtype)[1::2]:  # one shape per number of tasks, P > T
        if kind == "zero":
            g = torch.zeros_like(g)
        elif kind == "zero_row":
            g = g.clone()
            g[1] = 0
        elif kind == "identical_rows":
            g = g[:1].expand_as(g).clone()
        elif kind == "opposite_rows":
            g = torch.cat([g[:1], -g[:1]])
        out.append(g)
    return out


def parallel(update: Tensor, row: Tensor) -> bool:
    """``update = c·row`` with c >= 0 (up to rounding)."""
    u, r = update.double(), row.double()
    c = (u @ r) / (r @ r)
    return bool(c >= -1e-12 and (u - c * r).norm() <= 1e-3 * max(float(u.norm()), 1e-30))


def check_permutation(name: str, dtype: torch.dtype) -> list[str]:
    """``A(ΠG) = A(G)`` and the weights follow the rows: ``w(ΠG) = Π w(G)``."""
    bad = []
    gen = torch.Generator().manual_seed(1)
    for g in jacobians(dtype):
        perm = torch.randperm(g.shape[0], generator=gen)
        (u1, w1), (u2, w2) = aggregate(name, g), aggregate(name, g[perm])
        tol, scale = tolerance(g), float(g.double().norm())
        # with T > P the weights that give an update are not unique: only the update is compared
        same_weights = g.shape[0] > g.shape[1] or name in EFFECTIVE_WEIGHTS or close(w1[perm], w2, tol)
        if not (close(u1, u2, tol, scale) and same_weights):
            bad.append(f"G{tuple(g.shape)}, permutation {perm.tolist()}: {u1.tolist()} vs {u2.tolist()}")
    return bad


def check_scaling(name: str, dtype: torch.dtype) -> list[str]:
    """Linear under scaling (TorchJD's property): ``A(diag(αc₁ + βc₂)G) = αA(diag(c₁)G) + βA(diag(c₂)G)``."""
    bad = []
    gen = torch.Generator().manual_seed(2)
    for g in jacobians(dtype):
        c1, c2 = (torch.rand(g.shape[0], 1, generator=gen, dtype=g.dtype) + 0.1 for _ in range(2))
        a, b = (float(x) for x in torch.rand(2, generator=gen) + 0.1)
        expected = a * aggregate(name, c1 * g)[0] + b * aggregate(name, c2 * g)[0]
        got = aggregate(name, (a * c1 + b * c2) * g)[0]
        if not close(got, expected, tolerance(g), float(g.double().norm())):
            bad.append(f"G{tuple(g.shape)}: {got.tolist()} vs {expected.tolist()}")
    return bad


def close(a: Tensor, b: Tensor, tol: float, scale: float = 1e-30) -> bool:
    """``‖a − b‖ <= tol·max(‖a‖, ‖b‖, scale)`` (``scale``: the input's size, for results that are 0 up to rounding)."""
    a, b = a.double(), b.double()
    return bool((a - b).norm() <= tol * max(float(a.norm()), float(b.norm()), scale))


def check_precision(name: str) -> list[str]:
    """The float32 update is the float64 one, to float32 accuracy (relative to the Jacobian's size)."""
    bad = []
    for g32, g64 in zip(jacobians(torch.float32), jacobians(torch.float64), strict=True):
        u32, u64 = aggregate(name, g32)[0], aggregate(name, g64)[0]
        if not close(u32, u64, 1e-3, float(g64.norm())):
            bad.append(f"G{tuple(g64.shape)}: float32 {u32.tolist()} vs float64 {u64.tolist()}")
    return bad


def check_cagrad_objective(dtype: torch.dtype) -> list[str]:
    """CAGrad's d = update/(T·…) maximises min_t g_tᵀd over the ball ‖d − g_0‖ <= c‖g_0‖: no feasible point found by
    an independent solver (SLSQP on the primal, in float64) does better than d rescaled into the ball."""
    bad = []
    for g in jacobians(dtype):
        g64 = g.double()
        w = fresh("cagrad", g.shape[0])
        d = aggregate("cagrad", g)[0].double() * (1 + w.c**2) / g.shape[0]  # undo rescale=1 and the factor T
        best = cagrad_primal(g64.numpy(), w.c)
        got = float((g64 @ d).min())
        if got < best - tolerance(g) * float(g64.norm()) ** 2:
            bad.append(f"G{tuple(g.shape)}: min_t g_t·d = {got}, the ball holds {best}")
    return bad


def check_equal_projections(name: str, dtype: torch.dtype) -> list[str]:
    """IMTL-G (Liu et al., ICLR 2021) and ConFIG (Liu et al., ICLR 2025): ``dᵀg_t/‖g_t‖`` is the same for every task
    and positive (equal projections onto the unit gradients = equal cosines), where the rows are linearly
    independent (else no such direction need exist)."""
    bad = []
    for g in jacobians(dtype):
        g64 = g.double()
        if g.shape[1] < g.shape[0] or torch.linalg.matrix_rank(g64) < g.shape[0]:
            continue
        d = aggregate(name, g)[0].double()
        proj = g64 @ d / g64.norm(dim=1)
        if not (proj.min() > 0 and proj.max() - proj.min() <= 10 * tolerance(g) * proj.abs().max()):
            bad.append(f"G{tuple(g.shape)}: projections {proj.tolist()}")
    return bad


def cagrad_primal(g, c: float) -> float:
    """max_{‖d − g_0‖ <= c‖g_0‖} min_t g_tᵀd, as max s s.t. g_tᵀd >= s (an independent solve of the primal)."""
    import numpy as np
    from scipy.optimize import minimize

    g0 = g.mean(axis=0)
    radius2 = c**2 * float(g0 @ g0)
    cons = [
        {"type": "ineq", "fun": lambda x: g @ x[:-1] - x[-1]},
        {"type": "ineq", "fun": lambda x: radius2 - float((x[:-1] - g0) @ (x[:-1] - g0))},
    ]
    x0 = np.append(g0, float((g @ g0).min()))
    res = minimize(lambda x: -x[-1], x0, method="SLSQP", constraints=cons, options={"ftol": 1e-12, "maxiter": 500})
    return float((g @ res.x[:-1]).min()) if res.success else float((g @ g0).min())


def check_aggregator(name: str, prop: str, dtype: torch.dtype) -> list[str]:
    if prop == "structure":
        return check_structure(name, dtype)
    if prop == "permutation":
        return check_permutation(name, dtype)
    if prop == "scaling":
        return check_scaling(name, dtype)
    if prop == "precision":
        return check_precision(name)
    if prop == "cagrad_objective":
        return check_cagrad_objective(dtype)
    if prop in ("imtl_projections", "config_angles"):
        return check_equal_projections(name, dtype)
    return check_special(name, dtype, prop)


# -- random visiting order ------------------------------------------------------------------------------------
def random_order_outputs(w, calls: int = 12) -> list[Tensor]:
    g = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 4 tasks in 3-D conflict
    return [w.aggregate(g)[0] for _ in range(calls)]


# -- loss-level properties -------------------------------------------------------------------------------------
LOSS_CASES = {
    "zero_losses": [[0.0, 0.0, 0.0], [0.0, 1.0, 2.0]] * 3,
    "extreme_losses": [[1e-30, 1e30, 1.0], [1e30, 1e-30, 1.0]] * 3,
}


def check_losses(name: str, prop: str, dtype: torch.dtype) -> list[str]:
    """Finite weights at every step of three epochs of two steps each, through every hook, for the losses of ``prop``.

    ``L_t = v_t·θ_t``, so the per-task gradients (for a method that asks for them) are ``diag(v)``.
    """
    w = fresh(name, 3).to(dtype)
    bad = []
    for step, values in enumerate(LOSS_CASES[prop]):
        theta = torch.ones(3, dtype=dtype, requires_grad=True)
        v = torch.tensor(values, dtype=dtype)
        losses = v * theta
        grads = torch.diag(v) if w.needs_task_grads else None
        weights = w.backward(losses, grads, [theta], lambda total, exclude=(): total.backward())
        w.after_optimizer_step(losses.detach())
        if step % 2 == 1:
            w.on_train_epoch_end(step // 2)
        if not torch.isfinite(weights).all():
            bad.append(f"step {step}, losses {values}: weights {weights.tolist()}")
    return bad
