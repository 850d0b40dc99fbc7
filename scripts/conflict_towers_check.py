"""Tests the random-tower hypothesis behind the conflict-estimator study (docs/results.md, issue 15).

Hypothesis: task t reaches the shared layers through its own randomly initialised tower, g_t = J_tᵀ δ_t, so the
parameter-space cosine of two tasks' gradients is scrambled by the towers (J_1 J_2ᵀ) early in training whatever
the tasks' relatedness. Check, at initialisation (no training step, so nothing else changes): on the default
synthetic run (Ma et al. 2018 §3.2, shared_bottom) the tasks' gradients of the shared parameters summed over the
first ``--batches`` training batches, their cosine with the towers (and heads) as initialised and with task 2's
tower and head replaced by copies of task 1's (J_1 = J_2), beside the function-space ``output_cosine`` (mean over
the same batches) and the labels' Pearson correlation on the training split::

    python scripts/conflict_towers_check.py --seeds 0 1 2 --batches 12
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from scipy.stats import spearmanr

from mtl_experiments.bench.build import build_model, compose_config, load_data
from mtl_experiments.metrics.conflict import gramian, pairwise_cosine
from mtl_experiments.metrics.conflict_output import output_cosine, output_residuals

CORRELATIONS = (0.0, 0.25, 0.5, 0.75, 1.0)


def cosines_at_init(model, tasks, batches) -> tuple[float, float]:
    """(cos of the tasks' shared-parameter gradients summed over ``batches``, mean per-batch ``output_cosine``)."""
    shared = model.shared_parameters()
    total, outs = None, []
    for batch in batches:
        outputs = model(batch["features"])
        losses = [task.loss(outputs[n], batch["labels"][n]) for n, task in tasks.items()]
        g = torch.stack(
            [torch.cat([x.flatten() for x in torch.autograd.grad(loss, shared, retain_graph=True)]) for loss in losses]
        )
        total = g if total is None else total + g
        d, m, _ = output_residuals(tasks, outputs, batch["labels"], {})
        outs.append(float(output_cosine(d, m)[0, 1]))
    return float(pairwise_cosine(gramian(total))[0, 1]), float(np.mean(outs))


def identical_towers(model, names) -> None:
    """Task 2's tower and head become copies of task 1's: the two tasks' Jacobians of the shared layers agree."""
    first, second = names
    model.backbone.towers[second].load_state_dict(model.backbone.towers[first].state_dict())
    model.heads[second].load_state_dict(model.heads[first].state_dict())


def measure(correlation: float, seed: int, n_batches: int) -> dict[str, float]:
    cfg = compose_config([f"data.correlation={correlation}", f"seed={seed}"])
    dm = load_data(cfg)
    batches = list(itertools.islice(dm.train_dataloader(), n_batches))
    labels = torch.stack([torch.cat([b["labels"][n] for b in dm.train_dataloader()]) for n in dm.tasks])
    row = {"label_correlation": float(np.corrcoef(labels.double().numpy())[0, 1])}
    model = build_model(cfg, dm)
    row["param_cosine_random_towers"], row["output_cosine"] = cosines_at_init(model, dm.tasks, batches)
    identical_towers(model, list(dm.tasks))
    row["param_cosine_identical_towers"], _ = cosines_at_init(model, dm.tasks, batches)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=12)
    args = parser.parse_args()
    rows = {(c, s): measure(c, s, args.batches) for c in CORRELATIONS for s in args.seeds}
    names = list(next(iter(rows.values())))
    print("| quantity | " + " | ".join(f"ρ_task = {c:g}" for c in CORRELATIONS) + " | Spearman ρ (all runs) |")
    print("| --- | " + " | ".join("---:" for _ in CORRELATIONS) + " | ---: |")
    for name in names:
        cells = []
        for c in CORRELATIONS:
            v = [rows[c, s][name] for s in args.seeds]
            cells.append(f"{np.mean(v):+.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}")
        rho = spearmanr([c for c, _ in rows], [r[name] for r in rows.values()]).statistic
        print(f"| `{name}` | " + " | ".join(cells) + f" | {rho:+.2f} |")


if __name__ == "__main__":
    main()
