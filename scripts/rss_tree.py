"""Memory of a command's process tree while it runs, for measuring ``train.py`` (docs/results.md, issue 13).

    PYTHONPATH=scripts python scripts/rss_tree.py python train.py data=stream data.path=log ... \\
        +callbacks.rss._target_=rss_tree.RssTimeline +callbacks.rss.path=timeline.tsv

Every 0.5 s the RSS and the PSS (a page shared by N processes counted 1/N) of the command's process and all its
descendants (DataLoader workers) are summed; the peaks (MB) are printed at the end, with the command's own.
``RssTimeline``, a Lightning callback in the trainer, appends ``step, seconds, VmRSS MB`` of the trainer every
``every`` optimizer steps, so memory can be read against steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import lightning.pytorch as pl


def children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:  # ended meanwhile
            continue
        kids.setdefault(ppid, []).append(int(p))
    return kids


def tree(pid: int) -> list[int]:
    """``pid`` first, then its descendants."""
    kids, out, todo = children(), [], [pid]
    while todo:
        q = todo.pop(0)
        out.append(q)
        todo += kids.get(q, [])
    return out


def field(pid: int, name: str, path: str = "smaps_rollup") -> float:
    """A ``kB`` field of /proc/<pid>/<path> in MB (0 when the process has ended)."""
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(name):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RssTimeline(pl.Callback):
    """Appends ``step, seconds, VmRSS MB`` of this (the trainer's) process to ``path`` every ``every`` steps."""

    def __init__(self, path: str, every: int = 50):
        self.path, self.every, self.t0 = path, every, time.time()
        with open(path, "w") as f:
            f.write("step\tseconds\tmain_rss_mb\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            with open(self.path, "a") as f:
                rss = field(os.getpid(), "VmRSS:", "status")
                f.write(f"{trainer.global_step}\t{time.time() - self.t0:.1f}\t{rss:.0f}\n")


def main(command: list[str]) -> int:
    proc = subprocess.Popen(command)
    peak = dict.fromkeys(("tree_rss", "tree_pss", "main_rss", "main_pss", "procs"), 0.0)
    t0 = time.time()
    while proc.poll() is None:
        pids = tree(proc.pid)
        rss, pss = [field(p, "Rss:") for p in pids], [field(p, "Pss:") for p in pids]
        if sum(rss) > peak["tree_rss"]:
            peak["tree_rss"], peak["procs"] = sum(rss), len(pids)
        peak["tree_pss"] = max(peak["tree_pss"], sum(pss))
        peak["main_rss"], peak["main_pss"] = max(peak["main_rss"], rss[0]), max(peak["main_pss"], pss[0])
        time.sleep(0.5)
    values = " ".join(f"{k}={v:.0f}" for k, v in peak.items())
    print(f"PEAK_MB {values} wall={time.time() - t0:.0f}s rc={proc.returncode}", flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
