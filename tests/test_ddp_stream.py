"""A 2-node ``data=stream`` job launched as on a cluster: two ``torchrun --nnodes=2`` launchers (both "nodes" on
127.0.0.1, one CPU process each, c10d rendezvous) run tests/ddp_stream_worker.py. Checked: every training row is
trained on exactly once per epoch across the two ranks (the ``N mod 2`` remainder dropped), both ranks take the
same number of steps, and the replicas end bit-identical (DDP kept them in step)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from scripts.make_log import write_log
from tests.conftest import ROOT, free_port

WORKER = ROOT / "tests" / "ddp_stream_worker.py"


@pytest.mark.slow  # two launchers and two ranks each import the stack: most of its time is process start-up
def test_two_node_torchrun_trains_every_row_once_per_epoch(tmp_path):
    log = tmp_path / "log"
    write_log(log, rows=1200, shards=3, seed=4, row_group=200, num_users=80, num_items=40, latent_dim=4)
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
              "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=stream-test",
              "--max-restarts=0", str(WORKER), str(out), str(log)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(launch, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [n.returncode for n in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    from mtl_experiments.data.stream import StreamDataModule

    dm = StreamDataModule(**{k: v for k, v in ranks[0]["data"].items() if k != "_target_"})
    dm.setup()
    train = set()
    for shard in dm.source.shards:  # the training rows, read independently of the loader
        table = pq.read_table(shard.path)
        codes = dm.source.split_rule.codes(table, shard, 0, dm.columns.timestamp)
        train |= set(table.column("row_id").to_numpy()[codes == 0].tolist())
    for epoch in (0, 1):
        per_rank = [r["rows"][epoch] for r in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == len(train) // 2
        both = per_rank[0] + per_rank[1]
        assert len(set(both)) == len(both) and set(both) <= train  # every row once, none twice
    assert ranks[0]["rows"][0] != ranks[0]["rows"][1]  # the order is reshuffled per epoch
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert np.isfinite(sum(float(v.float().sum()) for v in ranks[0]["state"].values()))
