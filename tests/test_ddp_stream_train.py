"""``train.py`` itself as a 2-node ``data=stream`` job, in its two multi-node forms, both "nodes" on 127.0.0.1
(one CPU process each, gloo), started at the same time:

- torchrun: two ``torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d`` launchers, as on two nodes;
- Slurm: two ``python train.py`` processes with the environment ``srun`` gives each task of a
  ``--nodes=2 --ntasks-per-node=1`` job (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_NODEID``, ...), so that
  Lightning's ``SLURMEnvironment`` sets the ranks and the address (the first host of ``SLURM_NODELIST``).

Checked for each: both processes exit 0; the MLflow store holds one run (rank 0's), FINISHED; every epoch's
``data/rows_read`` is the number of training rows (counted independently, tests/test_ddp_stream.py's
``train_row_ids``) minus the logged ``data/rows_dropped``; the run's checkpoint folder (its tag) holds the last and
the best checkpoint. Not covered: the scheduler itself (sbatch, srun, node allocation) and the submitit launcher's
side (``-m hydra/launcher=submitit_slurm`` pickles the job and runs it in every task: the environment here is
what that task sees, the command is train.py's single run instead of submitit's unpickled one), real separate
hosts and GPUs (NCCL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mtl_experiments.tracking.metadata import CHECKPOINT_DIR_TAG
from scripts.make_log import write_log
from tests.conftest import ROOT, free_port, fresh_store
from tests.test_ddp_stream import train_row_ids

EPOCHS = 2
# 600 rows: ~480 train rows, 7 steps of 2 x 32 per epoch; the smallest model the stream data builds
JOB = ["data=stream", "data.row_id_column=row_id", "data.batch_size=32", "data.shuffle_buffer=100",
       "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=1", "trainer.accelerator=cpu",
       f"trainer.max_epochs={EPOCHS}", "trainer.enable_model_summary=false", "~callbacks.progress_bar",
       "~callbacks.early_stopping"]  # fmt: skip
FORMS = ("torchrun", "slurm")


def slurm_env(rank: int, port: int) -> dict[str, str]:
    """What srun sets for task ``rank`` of ``sbatch --nodes=2 --ntasks-per-node=1`` (the variables Lightning's
    SLURMEnvironment reads and validates); the job name is not bash/interactive, which would turn it off."""
    return {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "2", "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank), "SLURM_JOB_NAME": "mtl-stream", "SLURM_JOB_ID": "4242",
            "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip


def start(form: str, tmp: Path, log: Path, uri: str) -> list[subprocess.Popen]:
    """The two "nodes" of one form, started without waiting."""
    args = [str(ROOT / "train.py"), *JOB, f"data.path={log}", f"logger.mlflow.tracking_uri={uri}",
            f"hydra.run.dir={tmp / form}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()
    if form == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                  "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={form}",
                  "--max-restarts=0", *args]  # fmt: skip
        commands = [(launch, env) for _ in (0, 1)]
    else:
        commands = [([sys.executable, *args], {**env, **slurm_env(r, port)}) for r in (0, 1)]
    nodes = []
    for r, (cmd, node_env) in enumerate(commands):
        with open(tmp / f"{form}-node{r}.log", "w") as out:  # a file, not a pipe: nothing blocks on a full pipe
            nodes.append(subprocess.Popen(cmd, env=node_env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                          start_new_session=True))  # fmt: skip
    return nodes


def wait(nodes: list[subprocess.Popen], timeout: float = 600) -> None:
    """Until every node has ended; once one fails (its peers would wait for it until DDP's timeout) or the time is
    up, the others are stopped with their process groups (a launcher's worker too)."""
    deadline = time.monotonic() + timeout
    while any(n.poll() is None for n in nodes) and not any(n.returncode for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.5)
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, empty_store):
    """Both forms run at once: ``{form: tracking URI}`` and the log."""
    tmp = tmp_path_factory.mktemp("ddp_stream_train")
    log = tmp / "log"
    write_log(log, rows=600, shards=3, seed=5, row_group=100, num_users=60, num_items=30, latent_dim=4)
    uris = {form: fresh_store(empty_store, tmp / form / "mlflow.db") for form in FORMS}
    procs = {form: start(form, tmp, log, uris[form]) for form in FORMS}
    wait([node for nodes in procs.values() for node in nodes])
    for form, nodes in procs.items():
        out = [(tmp / f"{form}-node{r}.log").read_text() for r in (0, 1)]
        assert [n.returncode for n in nodes] == [0, 0], f"{form}:\n" + out[0][-3000:] + "\n---\n" + out[1][-3000:]
        ranks = [f"GLOBAL_RANK: {r}, MEMBER: {r + 1}/2" for r in (0, 1)]  # Lightning's line: the ranks it was given
        assert all(any(rank in text for text in out) for rank in ranks), form
    return uris, log


@pytest.mark.slow  # four train.py processes (and two launchers) import the whole stack: mostly process start-up
@pytest.mark.parametrize("form", FORMS)
def test_train_py_as_a_two_node_job_trains_every_row_once_into_one_run(jobs, form):
    uris, log = jobs
    client = MlflowClient(uris[form])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # rank 0's only
    (run,) = runs
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.num_nodes"] == "2" and run.data.params["trainer.devices"] == "1"
    read, dropped = (client.get_metric_history(run.info.run_id, f"data/{k}") for k in ("rows_read", "rows_dropped"))
    assert len(read) == len(dropped) == EPOCHS  # once per epoch, by rank 0 only
    train = len(train_row_ids(log))
    for r, d in zip(read, dropped, strict=True):
        assert d.value == train % 2 and r.value == train - d.value  # every row once across the two ranks
    checkpoints = Path(run.data.tags[CHECKPOINT_DIR_TAG])
    assert (checkpoints / "last.ckpt").is_file() and list(checkpoints.glob("best-epoch*.ckpt"))
