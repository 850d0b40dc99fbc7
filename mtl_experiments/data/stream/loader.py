"""Batches streamed from the shards (data/stream): an epoch's rows divided across DDP ranks and DataLoader workers
so that each row is read exactly once, a seeded shard order and bounded shuffle buffer, and a resumable position.

An epoch's plan is a function of ``(seed, epoch)`` alone, the same in every process: the shards in a seeded order
(reshuffled every epoch), their rows of the split (counted per row group by the statistics pass) laid end to
end as positions 0..N-1. Rank r of W takes positions ``[r·⌊N/W⌋, (r+1)·⌊N/W⌋)``, so every rank has the same rows
and batches; the last ``N mod W`` positions of the epoch's order are dropped and counted (``rows_dropped``, as
the in-memory loader drops them: different rows every epoch). Worker w of a rank's K DataLoader workers takes a
contiguous part of the rank's range. Each reads only the row groups its range touches. Training rows pass a
shuffle buffer of ``shuffle_buffer`` rows: each incoming row group joins the buffer and all but
``shuffle_buffer`` rows of it leave in a random order (every buffered row equally likely), seeded by
``(seed, epoch, rank, worker)``. Workers hand batches over as numpy arrays (one pickled message each; torch
tensors would each be moved into a shared-memory file), the main process makes the tensors; each worker keeps
``PREFETCH_BATCHES`` batches ready, so its bursts (a row group at a time) do not stall the trainer. Under DDP with
``on_bad_shard=skip`` the ranks agree before every batch that each has one (``StreamLoader.in_step``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mtl_experiments.data.base import LoaderPosition
from mtl_experiments.data.stream.allocator import reuse_freed_memory
from mtl_experiments.data.stream.shards import SPLIT_CODES
from mtl_experiments.data.stream.stats import row_groups
from mtl_experiments.errors import DataError

log = logging.getLogger(__name__)
# batches each DataLoader worker keeps ready ahead of the trainer (torch's default: 2). A worker's cost comes in
# bursts: a row group (~100 batches of 512) is read, encoded and shuffled at once; with 2 batches ahead, the trainer
# waits at every such burst whenever the worker does not have a free core right away (profiled: issue 13).
PREFETCH_BATCHES = 32


def take(tree, index):
    """The rows ``index`` of every array of a nested dict."""
    if isinstance(tree, dict):
        return {k: take(v, index) for k, v in tree.items()}
    return tree[index]


def concat(blocks: list):
    if isinstance(blocks[0], dict):
        return {k: concat([b[k] for b in blocks]) for k in blocks[0]}
    return np.concatenate(blocks)


def length(tree) -> int:
    return length(next(iter(tree.values()))) if isinstance(tree, dict) else len(tree)


def tensors(tree):
    """Tensors owning their memory: a batch cut from a row group's block must not keep the block alive when a
    consumer keeps the batch (the module keeps training labels until the epoch ends)."""
    if isinstance(tree, dict):
        return {k: tensors(v) for k, v in tree.items()}
    return torch.from_numpy(np.array(tree, order="C", copy=True))


def as_is(block):
    """The DataLoader's collate function: the block unchanged (its default would make tensors in the worker)."""
    return block


def share(total: int, parts: int, k: int) -> tuple[int, int]:
    """The k-th of ``parts`` contiguous, near-equal parts of ``range(total)``."""
    size, extra = divmod(total, parts)
    lo = k * size + min(k, extra)
    return lo, lo + size + (k < extra)


class Plan:
    """One epoch's division of a split's rows (see the module docstring)."""

    def __init__(self, shards: list, counts: Mapping, split: str, seed: int, epoch: int, shuffle: bool, world: int):
        code = SPLIT_CODES[split]
        order = list(range(len(shards)))
        if shuffle:
            order = np.random.default_rng([seed, epoch, 7]).permutation(len(shards)).tolist()
        self.pieces = []  # (shard, row group, first position, rows of the split in it)
        position = 0
        for s in order:
            for g, per_split in enumerate(counts[shards[s].name]):
                if per_split[code]:
                    self.pieces.append((shards[s], g, position, per_split[code]))
                    position += per_split[code]
        self.total = position
        self.per_rank = position // world
        self.dropped = position - self.per_rank * world

    def groups(self, lo: int, hi: int) -> list[tuple]:
        """``(shard, row group, rows of the split to skip in it, rows to take)`` covering positions [lo, hi)."""
        out = []
        for shard, g, first, n in self.pieces:
            a, b = max(lo, first), min(hi, first + n)
            if a < b:
                out.append((shard, g, a - first, b - a))
        return out


def batch_counts(rows: int, workers: int, batch_size: int) -> list[int]:
    return [math.ceil((lambda lo, hi: hi - lo)(*share(rows, workers, w)) / batch_size) for w in range(workers)]


def interleaved_skip(counts: list[int], skip: int) -> tuple[list[int], int]:
    """How many of each part's batches the first ``skip`` batches of a DataLoader hold, and the part whose batch
    comes next: it takes them from its workers in turn, passing over a worker that has none left. A resumed epoch
    gives its first worker that part (and the next worker the part after it), so the turns continue unchanged."""
    taken, turn = [0] * len(counts), 0
    while skip > 0:
        if taken[turn] < counts[turn]:
            taken[turn] += 1
            skip -= 1
        turn = (turn + 1) % len(counts)
    while sum(taken) < sum(counts) and taken[turn] >= counts[turn]:
        turn = (turn + 1) % len(counts)
    return taken, turn


class StreamDataset(IterableDataset):
    """The batches of one rank in one epoch; under a DataLoader with workers, each worker its part."""

    def __init__(
        self,
        source,
        split: str,
        plan: Plan,
        rank: int,
        batch_size: int,
        skip: list[int],
        first_part: int,
        seed: int,
        epoch: int,
        shuffle_buffer: int,
    ):
        self.first_part = first_part  # the part (of the rank's rows) worker 0 reads
        self.source, self.split, self.plan, self.rank, self.batch_size = source, split, plan, rank, batch_size
        self.skip, self.seed, self.epoch, self.buffer_rows = skip, seed, epoch, shuffle_buffer

    def __iter__(self) -> Iterator[dict]:
        """Batches as numpy arrays: they cross from a worker process pickled in one message (a torch tensor would
        be moved to a shared-memory file of its own, a few system calls per tensor, about ten per batch)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        part = (worker + self.first_part) % workers  # a resumed epoch starts at the part whose turn it is
        lo, hi = share(self.plan.per_rank, workers, part)
        base = self.rank * self.plan.per_rank
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, part])
        pending, skip, served = None, self.skip[part], 0
        for block in self.rows(self.plan.groups(base + lo, base + hi), rng):
            pending = block if pending is None else concat([pending, block])
            while length(pending) >= self.batch_size:
                batch, pending = take(pending, slice(0, self.batch_size)), take(pending, slice(self.batch_size, None))
                served += 1
                if served > skip:
                    yield batch
        if pending is not None and length(pending) and served + 1 > skip:
            yield pending

    def rows(self, groups: list[tuple], rng: np.random.Generator) -> Iterator[dict]:
        """The split's rows of ``groups`` in order, through the shuffle buffer when training."""
        buffer = None
        for block in read_groups(self.source, groups, self.split):
            if self.buffer_rows <= 0:
                yield block
                continue
            buffer = block if buffer is None else concat([buffer, block])
            n = length(buffer)
            if n > self.buffer_rows:
                order = rng.permutation(n)
                yield take(buffer, order[: n - self.buffer_rows])
                buffer = take(buffer, order[n - self.buffer_rows :])
        if buffer is not None and length(buffer):
            yield take(buffer, rng.permutation(length(buffer)))


class StreamLoader(LoaderPosition):
    """What ``train_dataloader`` / ``val_dataloader`` return: the batches of one rank, ``len()`` of them per epoch,
    resumable like ``TensorBatchLoader`` (data/base.py): ``state_dict`` is the position ``{"epoch", "batch"}``
    of the next batch (plus what must match on resume); an epoch resumed at batch k replays the same plan and
    shuffle and hands out batches k, k+1, ... (rows before it are read again but not trained on)."""

    def __init__(
        self,
        source,
        split: str,
        batch_size: int,
        seed: int,
        shuffle: bool,
        rank: int = 0,
        world: int = 1,
        workers: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        on_epoch_end: Callable[[dict], None] | None = None,
        agree: Callable[[bool], bool] | None = None,
    ):
        super().__init__(epoch_fn)
        self.source, self.split, self.batch_size, self.seed, self.shuffle = source, split, batch_size, seed, shuffle
        self.rank, self.world, self.workers, self.on_epoch_end = rank, world, workers, on_epoch_end
        self.agree = agree  # under DDP with on_bad_shard=skip: "has every rank a batch?" (see `in_step`)

    def plan(self, epoch: int) -> Plan:
        return Plan(self.source.shards, self.source.counts, self.split, self.seed, epoch, self.shuffle, self.world)

    def counts(self, plan: Plan) -> list[int]:
        return batch_counts(plan.per_rank, max(1, self.workers), self.batch_size)

    def __len__(self) -> int:
        return sum(self.counts(self.plan(self.epoch)))

    def __iter__(self) -> Iterator[dict]:
        reuse_freed_memory()  # the training process's allocator (see there); the workers inherit it
        epoch, skip = self.begin_epoch()
        plan = self.plan(epoch)
        counts = self.counts(plan)
        dataset = StreamDataset(
            self.source,
            self.split,
            plan,
            self.rank,
            self.batch_size,
            *interleaved_skip(counts, skip),
            self.seed,
            epoch,
            self.source.shuffle_buffer if self.shuffle else 0,
        )
        blocks = dataset
        if self.workers:
            blocks = DataLoader(
                dataset, batch_size=None, num_workers=self.workers, collate_fn=as_is, prefetch_factor=PREFETCH_BATCHES
            )
        segments = self.source.segments_of(self.split)
        rows, total, reported = 0, sum(counts), skip > 0  # a resumed epoch reads only part of its rows: no report
        for block in self.in_step(blocks, total - skip):
            batch = tensors(block)
            if segments is not None:
                batch["segments"] = segments(batch)
            self.served += 1
            rows += length(batch["labels"])
            if self.served == total and not reported:  # before the last batch: Lightning asks for no more
                reported = self.report(rows, plan)
            yield batch
        if not reported:  # fewer batches than planned: rows of a bad shard were skipped
            self.report(rows, plan)

    def in_step(self, blocks, planned: int) -> Iterator[dict]:
        """``blocks``; with ``agree`` (DDP, ``on_bad_shard=skip``) every rank first asks whether all ranks have a next
        batch and all stop at the first one that has none: a rank that skipped a bad shard mid-epoch has fewer
        batches, and DDP would wait forever for its missing steps. The rows the other ranks had left are then
        counted as skipped too (``report``: planned minus read)."""
        if self.agree is None:
            yield from blocks
            return
        blocks = iter(blocks)
        for _ in range(planned):
            block = next(blocks, None)
            if not self.agree(block is not None) or block is None:
                return
            yield block

    def report(self, rows: int, plan: Plan) -> bool:
        if self.on_epoch_end is not None:
            self.on_epoch_end({"rows_read": rows, "rows_skipped": plan.per_rank - rows, "rows_dropped": plan.dropped})
        return True

    RESUME_HINT = (
        "Resume with the settings the run started with (data.batch_size, data.num_workers, the devices, seed) on the "
        "same shards."
    )

    def settings(self) -> dict[str, int]:
        return {
            "batch_size": self.batch_size,
            "rows": self.source.rows(self.split),
            "seed": self.seed,
            "world": self.world,
            "workers": self.workers,
        }


def read_groups(source, groups: list[tuple], split: str) -> Iterator[dict]:
    """The encoded rows of ``split`` in ``groups`` (``(shard, row group, split rows to skip, rows to take)``); a row
    group that cannot be read stops the run, or with ``on_bad_shard=skip`` is left out (the loader counts the rows
    it did not get as ``rows_skipped``)."""
    code = SPLIT_CODES[split]
    for shard, g, skip, n in groups:
        try:
            ((_, first, table),) = row_groups(source.fs, shard, source.columns.read, [g])
            codes = source.split_rule.codes(table, shard, first, source.columns.timestamp)
            keep = np.flatnonzero(codes == code)[skip : skip + n]
            block = source.encoder(table.take(pa.array(keep)))
        except (OSError, pa.ArrowException) as e:
            if source.on_bad_shard != "skip":
                raise DataError(
                    f"Shard {shard.name} became unreadable mid-epoch ({e}); rewrite or remove it, or "
                    "set data.on_bad_shard=skip."
                ) from e
            log.warning("data=stream: %d rows of shard %s (row group %d) skipped: %s", n, shard.name, g, e)
            continue
        yield block
