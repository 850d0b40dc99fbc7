"""CPU time of one ``aggregate(G)`` per method: this tree's loss methods against another version's, in one process.

The other version's method files (``--old``: a folder of ``mtl_experiments/loss/*.py``, e.g. exported from an earlier
commit) are loaded beside this tree's; both run on the same G's ([T, P], a common component plus noise, drifting by
5% per step and rescaled by up to 20%, a fresh copy each call as autograd gives), for ``--rounds`` interleaved rounds
(alternating which goes first); the medians of the per-call CPU times are printed (CPU time: other processes on the
machine do not count).

    git archive 9b29b9c mtl_experiments/loss | tar -x -C /tmp/old
    OMP_NUM_THREADS=1 python scripts/aggregation_ab.py --old /tmp/old/mtl_experiments/loss
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate

from mtl_experiments.bench.build import compose_config

METHODS = "mgda,upgrad,imtl,cagrad,nash_mtl,aligned_mtl,fairgrad,sdmgrad,pcgrad"


def old_instance(cfg_loss, old: Path):
    """The method of ``cfg_loss`` built from the other version's file of the same name."""
    module_name, cls = cfg_loss._target_.rsplit(".", 1)
    name = module_name.rsplit(".", 1)[1]
    spec = importlib.util.spec_from_file_location(f"old_{name}", old / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kwargs = {k: instantiate(v) if hasattr(v, "_target_") else v for k, v in cfg_loss.items() if k != "_target_"}
    return getattr(module, cls)(**kwargs)


def trajectory(num_tasks: int, columns: int, steps: int = 30) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(num_tasks)
    g = torch.randn(columns, generator=gen) + torch.randn(num_tasks, columns, generator=gen)
    out = []
    for _ in range(steps):
        g = g + 0.05 * torch.randn(num_tasks, columns, generator=gen)
        out.append(g * (1 + 0.2 * torch.rand(num_tasks, 1, generator=gen)))
    return out


def cpu_ms(weighting, grads: list[torch.Tensor]) -> float:
    total = 0.0
    for g in grads:
        g = g.clone()
        start = time.process_time()
        weighting.aggregate(g)
        total += time.process_time() - start
    return 1e3 * total / len(grads)


def compare(methods: list[str], old: Path, num_tasks: int, columns: int, rounds: int) -> dict[str, tuple[float, float]]:
    grads = trajectory(num_tasks, columns)
    pairs = {}
    for m in methods:
        cfg = compose_config([f"loss={m}"])
        pairs[m] = (old_instance(cfg.loss, old), instantiate(cfg.loss))
        for w in pairs[m]:
            w.setup({f"t{i}": None for i in range(num_tasks)}, None)
            w.aggregate(grads[0])
    times = {m: ([], []) for m in methods}
    for r in range(rounds):
        for m in methods:
            for side in (0, 1) if r % 2 else (1, 0):
                times[m][side].append(cpu_ms(pairs[m][side], grads[1:]))
    return {m: (statistics.median(times[m][0]), statistics.median(times[m][1])) for m in methods}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the other version's mtl_experiments/loss folder")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--tasks", default="2,4")
    parser.add_argument("--columns", default="30208,665000", help="P: 30208 = MMoE on recsys_synthetic's shared G")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = {}
    for columns in (int(c) for c in args.columns.split(",")):
        for num_tasks in (int(t) for t in args.tasks.split(",")):
            result = compare(args.methods.split(","), args.old, num_tasks, columns, args.rounds)
            for m, (old_ms, new_ms) in result.items():
                rows[f"{m}@T{num_tasks}@P{columns}"] = {"old_ms": old_ms, "new_ms": new_ms}
                print(
                    f"{m:12s} T={num_tasks} P={columns:7d}  old {old_ms:7.3f} ms  new {new_ms:7.3f} ms"
                    f"  {new_ms / old_ms:5.2f}x",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
