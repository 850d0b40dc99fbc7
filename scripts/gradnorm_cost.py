"""CPU time of GradNorm's own work on one batch of a ``--methods`` model, beside the forward and the real backward.

    OMP_NUM_THREADS=1 python scripts/gradnorm_cost.py --model recsys --tasks 2   # also: --model mmoe665k, --tasks 4

Rows (median, first quartile and minimum of ``--repeats`` calls, ``time.process_time``, so other processes on a busy
machine count less): the forward (graph kept), the real backward over every parameter and without the parameters a
weighting sets itself (W for GradNorm, every shared one for a gradient method: ``backward_fn(..., exclude=...)``),
G over GradNorm's W (``grads.task_gradients``: each row from its task's own loss; with ``--old`` also the batched
backward through the stacked losses that it replaced), G over all shared parameters, and ``GradNorm.backward`` with the
real backward left out (the T-vector bookkeeping: norms, loss ratios, L_grad's gradient, Adam on w, Σw = T, and now
W's gradient Σ_t w_t·G_t).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtl_experiments import grads
from mtl_experiments.bench.build import build_module, compose_config, load_data
from mtl_experiments.bench.methods import MODELS, method_config


def cpu_ms(fn, repeats: int) -> tuple[float, float, float]:
    """(median, first quartile, minimum) milliseconds of CPU time of ``fn()`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(1e3 * (time.process_time() - start))
    times.sort()
    return statistics.median(times), times[len(times) // 4], times[0]


def through_stack(fn):
    """``fn`` with ``task_gradients``'s former path: the batched backward from the stacked losses."""

    def run():
        edges, grads.EDGE_OUTPUTS = grads.EDGE_OUTPUTS, False
        try:
            return fn()
        finally:
            grads.EDGE_OUTPUTS = edges  # as it was (False already on torch < 2.4)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="recsys", choices=[m for m in MODELS if m != "config"])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--old", action="store_true", help="also time the former paths through the stacked losses")
    args = parser.parse_args()
    overrides = MODELS[args.model]
    cfg = method_config(overrides, compose_config(overrides), args.tasks, "gradnorm")
    datamodule = load_data(cfg)
    module = build_module(cfg, datamodule)
    batch = next(iter(datamodule.train_dataloader()))
    model, weighting = module.model, module.weighting
    W = model.backbone.get_submodule(model.backbone.last_shared_layer).weight
    shared = list(model.shared_parameters())

    def forward():
        outputs, labels = model(batch["features"]), batch["labels"]  # the presets' tasks label every row
        return torch.stack([task.loss(outputs[name], labels[name]) for name, task in module.tasks.items()])

    losses = forward()
    rows = {
        "forward (graph kept)": forward,
        "real backward, all parameters": lambda: torch.autograd.grad(
            losses.sum(), list(model.parameters()), retain_graph=True, allow_unused=True
        ),
        "real backward, W excluded (GradNorm)": lambda: torch.autograd.grad(
            losses.sum(), [p for p in model.parameters() if p is not W], retain_graph=True, allow_unused=True
        ),
        "real backward, shared excluded (gradient)": lambda: torch.autograd.grad(
            losses.sum(), [p for p in model.parameters() if all(p is not q for q in shared)], retain_graph=True
        ),
        "G over W (each task's own loss)": lambda: grads.task_gradients(losses, [W]),
        "G over all shared parameters": lambda: grads.task_gradients(losses, shared),
    }
    if args.old:
        rows["G over W, batched through the stack (old)"] = through_stack(lambda: grads.task_gradients(losses, [W]))
        rows["G over all shared, batched (old)"] = through_stack(lambda: grads.task_gradients(losses, shared))
    G = grads.task_gradients(losses, [W])

    def bookkeeping():  # GradNorm.backward with the real backward left out (its own row above)
        return weighting.backward(losses.detach(), G, shared, lambda total, exclude=(): None)

    rows["GradNorm.backward without the real backward"] = bookkeeping
    print(f"{args.model}, T={args.tasks}: W {tuple(W.shape)}, {sum(p.numel() for p in shared):,} shared parameters")
    for name, fn in rows.items():
        median, quartile, low = cpu_ms(fn, args.repeats)
        print(f"  {name:44s} {median:8.3f} ms  (q1 {quartile:.3f}, min {low:.3f})")


if __name__ == "__main__":
    main()
