"""What large id tables cost per training step (``--sparse-scale``): dense Adam against sparse gradients +
SparseAdam.

The model: a user and an item id table of N rows each (``--sizes``, default 10k, 100k and 1M; the real
``FeatureEncoder``, embedding dimension 16) and a small MLP (32 -> 64 -> 1, binary cross-entropy on random
labels), batch 512 of uniformly drawn ids (``--batch-size``), in two modes: ``dense`` (ordinary tables, dense
gradients, ``torch.optim.Adam``: every step reads and writes every row and its moments) and ``sparse``
(``features.sparse=true`` tables and ``optimizer=sparse_adam``: SparseAdam for the tables, AdamW for the MLP).
Step time = zero_grad + forward + backward + optimizer step, median of ``--steps`` steps (default 50) after 5
untimed warm-up steps. Peak memory = the peak resident set size minus the RSS after imports, so it covers the
model, gradients, optimizer state, batches and activations; each (mode, N) runs in a fresh process
(``python -m mtl_experiments.bench.sparse_scale MODE:ROWS STEPS BATCH_SIZE``) so every peak is its own. The
``--repeats`` rounds run every configuration once each, interleaved; the table reports the medians over rounds
and the ratios largest N / smallest N per mode (aim: the sparse step time grows <= 1.5x from 10k to 1M rows).
Run it with ``OMP_NUM_THREADS=1`` to compare with the figures in the docs.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from mtl_experiments import checks
from mtl_experiments.bench.build import parameter_count
from mtl_experiments.bench.timing import fresh_process, interleaved, peak_rss_mb, rss_mb
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError

SPARSE_MODES = ("dense", "sparse")
SPARSE_DIM = 16
SPARSE_WARMUP = 5
SPARSE_TARGET = 1.5
MODULE = "mtl_experiments.bench.sparse_scale"  # what the fresh processes run (``python -m``)


def sparse_scale_model(rows: int, sparse: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """User and item id tables of ``rows`` rows each (+ the id 0) through the real encoder, and a small MLP."""
    from mtl_experiments.features import FeatureEncoder
    from mtl_experiments.optimizer.sparse_adam import SparseDenseAdam

    spec = FeatureSpec(
        categorical={"user_id": rows + 1, "item_id": rows + 1}, id_columns={"user_id": "user_id", "item_id": "item_id"}
    )
    torch.manual_seed(0)
    encoder = FeatureEncoder(spec, embedding_dim=SPARSE_DIM, sparse=sparse)
    model = torch.nn.Sequential(
        encoder, torch.nn.Linear(encoder.output_dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1), torch.nn.Flatten(0)
    )
    optimizer = (
        SparseDenseAdam(model.parameters(), lr=1e-3) if sparse else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    return model, optimizer


def measure_one(mode_rows: str, steps: int, batch_size: int) -> dict:
    """One ``MODE:ROWS`` measurement in this (fresh) process: ms per step, peak MB, parameters, threads."""
    mode, rows = mode_rows.split(":")
    rows = int(rows)
    baseline = rss_mb()
    model, optimizer = sparse_scale_model(rows, sparse=mode == "sparse")
    g = torch.Generator().manual_seed(0)
    n = SPARSE_WARMUP + steps
    ids = torch.randint(1, rows + 1, (n, batch_size, 2), generator=g)
    labels = (torch.rand(n, batch_size, generator=g) < 0.2).float()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    times = []
    for i in range(n):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model({"categorical": ids[i]}), labels[i]).backward()
        optimizer.step()
        if i >= SPARSE_WARMUP:
            times.append(time.perf_counter() - start)
    return {
        "ms_per_step": 1e3 * statistics.median(times),
        "peak_mb": peak_rss_mb() - baseline,
        "parameters": parameter_count(model),
        "num_threads": torch.get_num_threads(),
    }


def parse_sizes(sizes: str) -> list[int]:
    try:
        out = [int(x) for x in sizes.split(",")]
    except ValueError:
        out = []
    if not out or min(out) < 1:
        checks.fail("--sizes", "comma-separated positive integers", sizes)
    return out


def report(result: dict) -> None:
    sizes, ms, mb, ratios = result["sizes"], result["ms_per_step"], result["peak_mb"], result["ratios"]
    small, large = min(sizes), max(sizes)
    table = Table(
        title=f"id tables (user + item, dim {SPARSE_DIM}) + MLP, batch {result['batch_size']}: median of "
        f"{result['steps']} steps x {result['repeats']} round(s), {result['num_threads']} thread(s)"
    )
    table.add_column("rows per table", justify="right")
    for mode in SPARSE_MODES:
        table.add_column(f"{mode} ms/step", justify="right")
        table.add_column(f"{mode} peak MB", justify="right")
    table.add_column("dense / sparse time", justify="right")
    for rows in sizes:
        cells = []
        for mode in SPARSE_MODES:
            cells += [f"{ms[f'{mode}@{rows}']:.2f}", f"{mb[f'{mode}@{rows}']:.0f}"]
        table.add_row(f"{rows:,}", *cells, f"{ms[f'dense@{rows}'] / ms[f'sparse@{rows}']:.1f}x")
    table.add_row(
        f"{large:,} / {small:,}",
        *[f"{ratios[m][k]:.2f}x" for m in SPARSE_MODES for k in ("time", "memory")],
        "",
    )
    Console(width=140).print(table)
    growth = ratios["sparse"]["time"]
    verdict = "met" if growth <= SPARSE_TARGET else "not met"
    print(f"sparse step time {large:,} / {small:,} rows: {growth:.2f}x (target <= {SPARSE_TARGET}x: {verdict})")


def run(sizes: str, steps: int, batch_size: int, repeats: int, overrides: list[str] = ()) -> dict:
    """Step time and peak memory per table size, dense Adam against sparse tables + SparseAdam; ratios per mode.
    Prints the table and returns the numbers ``--json`` writes."""
    if overrides:
        raise ConfigError(f"--sparse-scale builds its own model and takes no Hydra overrides, got {overrides}.")
    table_rows = parse_sizes(sizes)
    configs = [(mode, rows) for rows in table_rows for mode in SPARSE_MODES]
    runs = {
        (mode, rows): lambda mode=mode, rows=rows: fresh_process(
            MODULE, [f"{mode}:{rows}", str(steps), str(batch_size)], f"{mode} with {rows} rows"
        )
        for mode, rows in configs
    }
    measured = interleaved(runs, repeats)  # each measurement in a fresh process (its own peak RSS)
    ms = {c: statistics.median(r["ms_per_step"] for r in rs) for c, rs in measured.items()}
    mb = {c: statistics.median(r["peak_mb"] for r in rs) for c, rs in measured.items()}
    small, large = min(table_rows), max(table_rows)
    result = {
        "sizes": table_rows,
        "embedding_dim": SPARSE_DIM,
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "num_threads": measured[configs[0]][0]["num_threads"],
        "ms_per_step": {f"{m}@{r}": v for (m, r), v in ms.items()},
        "peak_mb": {f"{m}@{r}": v for (m, r), v in mb.items()},
        "parameters": {f"{m}@{r}": rs[0]["parameters"] for (m, r), rs in measured.items()},
        "ratios": {
            mode: {"time": ms[(mode, large)] / ms[(mode, small)], "memory": mb[(mode, large)] / mb[(mode, small)]}
            for mode in SPARSE_MODES
        },
        "target": SPARSE_TARGET,
    }
    report(result)
    return result


def main(argv: list[str] | None = None) -> int:
    """The child process: ``MODE:ROWS STEPS BATCH_SIZE``; prints one JSON line."""
    mode_rows, steps, batch_size = sys.argv[1:] if argv is None else argv
    print(json.dumps(measure_one(mode_rows, int(steps), int(batch_size))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
