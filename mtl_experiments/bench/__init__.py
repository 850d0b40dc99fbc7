"""The measurements behind ``scripts/benchmark.py``: one module per measurement over shared helpers.

- ``throughput``: training samples/s of the Lightning path against a plain PyTorch loop (the default;
  ``--census`` and ``--rechub`` add torch-rechub's trainer, ``rechub``);
- ``methods``: step time of every loss weighting method relative to ``equal`` (``--methods``);
- ``conflict``: the cost of the task-conflict metrics (``--conflict``);
- ``one_vs_many``: one multi-task model against T single-task models (``--one-vs-many``);
- ``sparse_scale``: step time and peak memory of large id tables, dense against sparse (``--sparse-scale``);
- ``stream_scale``: peak memory and samples/s of ``data=stream`` against in-memory data (``--stream-scale``);
- ``startup``: wall seconds of a config error, ``--help`` and census's cache-hit load, in fresh processes
  (``--startup``);
- ``floor``: Lightning's own floor (the plain step in a bare ``LightningModule``) and the per-task-gradient floor;
- ``own_cost`` (``python -m mtl_experiments.bench.own_cost``): CPU time of each part of ``MTLModule``'s step;
- ``tracking_writes`` (``scripts/tracking_writes.py``): MLflow metric writes on and off the training thread;
- ``build``: config, data, models and trainers the way ``pipeline.train`` builds them;
- ``timing``: interleaved rounds, medians, step and epoch timers, peak RSS, fresh-process runs.

Each returns the numbers ``--json`` writes and prints its own table. These are measurements, not tests.
"""
