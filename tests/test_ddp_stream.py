"""A 2-node ``data=stream`` job launched as on a cluster: two ``torchrun --nnodes=2`` launchers (both "nodes" on
127.0.0.1, one CPU process each, c10d rendezvous) run tests/ddp_stream_worker.py, which trains the job twice.
Checked on the first run: every training row is trained on exactly once per epoch across the two ranks (the
``N mod 2`` remainder dropped), both ranks take the same number of steps, the replicas end bit-identical (DDP kept
them in step), and they equal one process trained on the global batches (rank 0's and rank 1's k-th batches
together: DDP's averaged gradient is the global batch's mean gradient when the ranks' batches are equally large).
The second run, with ``data.on_bad_shard=skip``, truncates rank 1's copy of a shard mid-job: both ranks stop
at the same step (without the agreement DDP waits for rank 1's missing steps) and the lost rows are counted."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning.pytorch as pl
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mtl_experiments.data.stream.loader import StreamLoader
from scripts.make_log import write_log
from tests.conftest import ROOT, free_port
from tests.ddp_stream_worker import EPOCHS, build_job

WORKER = ROOT / "tests" / "ddp_stream_worker.py"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The two runs of the 2-node job: ``(out dir, log dir)``."""
    tmp = tmp_path_factory.mktemp("ddp_stream")
    log = tmp / "log"
    write_log(log, rows=1200, shards=3, seed=4, row_group=200, num_users=80, num_items=40, latent_dim=4)
    out = tmp / "out"
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
    return out, log


def ranks(out, name: str = "") -> list[dict]:
    return [torch.load(out / f"{name}rank{r}.pt", weights_only=True) for r in (0, 1)]


def train_row_ids(log) -> set[int]:
    """The training rows, read independently of the loader: every shard whole, the split rule row by row."""
    _, dm, _ = build_job(str(log))
    train = set()
    for shard in dm.source.shards:
        table = pq.read_table(shard.path)
        codes = dm.source.split_rule.codes(table, shard, 0, dm.columns.timestamp)
        train |= set(table.column("row_id").to_numpy()[codes == 0].tolist())
    return train


@pytest.mark.slow  # two launchers and two ranks each import the stack: most of its time is process start-up
def test_two_node_torchrun_trains_every_row_once_per_epoch(job):
    out, log = job
    r0, r1 = ranks(out)
    assert [r0["world"], r1["world"]] == [2, 2]
    train = train_row_ids(log)
    for epoch in range(EPOCHS):
        per_rank = [r0["rows"][epoch], r1["rows"][epoch]]
        assert len(per_rank[0]) == len(per_rank[1]) == len(train) // 2
        both = per_rank[0] + per_rank[1]
        assert len(set(both)) == len(both) and set(both) <= train  # every row once, none twice
    assert r0["rows"][0] != r0["rows"][1]  # the order is reshuffled per epoch
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    assert np.isfinite(sum(float(v.float().sum()) for v in r0["state"].values()))


class GlobalBatches:
    """Rank 0's and rank 1's k-th batches of each epoch as one batch: what the 2-rank job steps on at step k."""

    def __init__(self, datamodule, trainer: pl.Trainer):
        dm, epoch = datamodule, lambda: trainer.current_epoch
        self.loaders = [
            StreamLoader(dm.source, "train", dm.batch_size, dm.shuffle_seed, True, rank, 2, epoch_fn=epoch)
            for rank in (0, 1)
        ]

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        for pair in zip(*self.loaders, strict=True):
            yield join(*pair)


def join(a, b):
    return {k: join(a[k], b[k]) for k in a} if isinstance(a, dict) else torch.cat([a, b])


@pytest.mark.slow  # shares the 2-node job
def test_two_ranks_end_where_one_process_ends_on_their_global_batches(job):
    out, log = job
    r0, _ = ranks(out)
    _, datamodule, module = build_job(str(log))  # the same seed: the same initial model as the ranks'
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=EPOCHS, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=GlobalBatches(datamodule, trainer))
    assert trainer.global_step == r0["steps"] > 0
    state = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    assert state.keys() == r0["state"].keys()
    for key, value in state.items():
        torch.testing.assert_close(r0["state"][key], value, atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow  # shares the 2-node job
def test_a_shard_skipped_by_one_rank_stops_both_at_the_same_step(job):
    out, _ = job
    r0, r1 = ranks(out, "skip")
    assert r0["bad_shard"] is None and r1["bad_shard"] is not None  # only rank 1's copy was truncated
    full = ranks(out)[0]["steps"] // EPOCHS  # steps of an epoch without a bad shard
    assert r0["steps"] == r1["steps"] < EPOCHS * full  # the same steps on both ranks, fewer than planned
    for epoch in range(EPOCHS):
        c = r0["counts"][epoch]
        assert c == r1["counts"][epoch]  # whole-job counts
        assert c["data/rows_read"] == len(r0["rows"][epoch]) + len(r1["rows"][epoch])
        rows = set(r0["rows"][epoch]) | set(r1["rows"][epoch])
        assert len(rows) == c["data/rows_read"]  # still no row twice
        assert c["data/rows_read"] + c["data/rows_skipped"] == len(ranks(out)[0]["rows"][epoch]) * 2  # none lost
    assert r0["counts"][0]["data/rows_skipped"] > 0
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
