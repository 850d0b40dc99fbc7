"""Warm-started aggregation solvers on a real training trajectory (issue 17): iterations and solution, warm vs cold.

Each method trains the realistic model (default: MMoE on recsys_synthetic, T = 2 and 4) for one epoch with its solver
warm-started across steps, as it ships, while every Gramian K = G Gᵀ it solves is kept. Then the Ks are solved again
in order, step by step, by one instance (warm, as in training) and by a fresh instance each (cold, as before issue
17), so that both are timed alike (CPU time of this process: other processes on the machine do not count).
Printed per method and task count: mean iterations warm / cold, the solve time per step warm / cold, and the largest
difference of the updates, ‖(w_warm − w_cold)ᵀG‖ / ‖w_coldᵀG‖ = √(δᵀKδ / w_coldᵀKw_cold).

    OMP_NUM_THREADS=1 python scripts/warm_start_study.py [--methods mgda,upgrad] [--tasks 2,4] [hydra overrides]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from mtl_experiments.bench.build import bare_trainer, build_module, compose_config, load_data
from mtl_experiments.bench.methods import task_overrides

METHODS = "mgda,upgrad,cagrad,nash_mtl,fairgrad"
MODEL = ["data=recsys_synthetic", "backbone=mmoe"]


def record_grams(weighting) -> list[torch.Tensor]:
    """Wrap ``weighting.weigh`` (on the instance) to keep a copy of every Gramian it solves."""
    grams, solve = [], weighting.weigh

    def weigh(gram: torch.Tensor) -> torch.Tensor:
        grams.append(gram.clone())
        return solve(gram)

    weighting.weigh = weigh
    return grams


def fresh(cfg):
    weighting = instantiate(cfg.loss)
    weighting.setup({name: None for name in cfg.data.tasks}, None)
    return weighting


def timed_solve(weighting, gram: torch.Tensor) -> tuple[float, torch.Tensor, float]:
    """(iterations, weights, seconds) of ``weighting``'s solve of ``gram``."""
    start = time.process_time()
    weights = weighting.weigh(gram)
    seconds = time.process_time() - start
    return float(weighting.log_values()["weighting/iterations"]), weights.double(), seconds


def study(overrides: list[str], method: str, num_tasks: int) -> dict:
    """Train one epoch keeping the Gramians, then solve them again in order: warm (one instance, as in training)
    and cold (a fresh instance each), interleaved step by step (alternating which goes first) so both are timed
    alike."""
    base = compose_config(overrides)
    cfg = compose_config([*overrides, *task_overrides(base, num_tasks), f"loss={method}"])
    datamodule = load_data(cfg)
    module = build_module(cfg, datamodule)
    grams = record_grams(module.weighting)
    bare_trainer(1).fit(module, datamodule=datamodule)
    warm = fresh(cfg)
    warm.weigh(grams[0])  # the first solve is cold in both
    totals, worst = [0.0, 0.0, 0.0, 0.0], 0.0
    for step, gram in enumerate(grams[1:]):
        cold = fresh(cfg)
        if step % 2:  # alternate which goes first: the second solve of a K finds it (and the code) in cache
            c_iterations, c_weights, c_seconds = timed_solve(cold, gram)
            w_iterations, w_weights, w_seconds = timed_solve(warm, gram)
        else:
            w_iterations, w_weights, w_seconds = timed_solve(warm, gram)
            c_iterations, c_weights, c_seconds = timed_solve(cold, gram)
        totals = [a + b for a, b in zip(totals, (w_iterations, c_iterations, w_seconds, c_seconds), strict=True)]
        delta, norm = w_weights - c_weights, float(c_weights @ gram @ c_weights)
        if norm > 0:
            worst = max(worst, math.sqrt(max(float(delta @ gram @ delta), 0.0) / norm))
    n = max(len(grams) - 1, 1)
    return {
        "method": method,
        "tasks": num_tasks,
        "steps": len(grams),
        "iterations_warm": totals[0] / n,
        "iterations_cold": totals[1] / n,
        "solve_ms_warm": 1e3 * totals[2] / n,
        "solve_ms_cold": 1e3 * totals[3] / n,
        "max_relative_update_difference": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--methods", default=METHODS, help=f"comma-separated (default {METHODS})")
    parser.add_argument("--tasks", default="2,4", help="task counts (default 2,4)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args, overrides = parser.parse_known_args()
    rows = []
    print("method      T  steps  iterations warm / cold  solve ms warm / cold  max update difference")
    for method in args.methods.split(","):
        for num_tasks in (int(t) for t in args.tasks.split(",")):
            r = study([*MODEL, *overrides], method, num_tasks)
            rows.append(r)
            print(
                f"{method:10s} {num_tasks:2d} {r['steps']:6d}  "
                f"{r['iterations_warm']:10.2f} / {r['iterations_cold']:<10.2f}"
                f"  {r['solve_ms_warm']:8.3f} / {r['solve_ms_cold']:<8.3f}  {r['max_relative_update_difference']:.2e}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
