"""The in-memory datamodule every dataset builds on: tasks checked at construction, splits loaded once, evaluation
segments, and a resumable whole-batch loader. The batch contract itself is data/spec.py's."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.data.spec import ID_KEYS, FeatureSpec, ItemInfo, LabelType, Split, Splits, gather, num_rows
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.tasks import Task, build_tasks

__all__ = ["FeatureSpec", "ItemInfo", "Split", "Splits", "TabularDataModule", "TensorBatchLoader", "require_file"]
MIN_SEGMENT_ROWS = 100  # evaluation segments (warm / cold_user / cold_item) with fewer rows are not reported


def segment_masks(split: Split, seen: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Which rows of an evaluation split are *warm* (user and item seen in training) and which are cold:
    ``cold_user`` (the user never appeared in training), ``cold_item`` (the item never did). A row can be
    both cold_user and cold_item. Only the id keys the split carries are considered."""
    cold = {}
    for key in ID_KEYS:
        if key in split and key in seen:
            cold[f"cold_{key[:-3]}"] = ~torch.isin(split[key], seen[key])
    if not cold:
        return {}
    warm = ~torch.stack(list(cold.values())).any(0)
    return {"warm": warm, **cold}


def require_file(path: str | Path, how_to_get: str) -> Path:
    """Return ``path`` if it is a file, else raise a DataError naming the path and how to obtain it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"Data file not found: {p.resolve()}. {how_to_get}")
    return p


class LoaderPosition:
    """Where a resumable loader is: the epoch the next iteration serves and, inside it, the next batch.

    ``state_dict`` is ``{"epoch", "batch"}`` plus ``settings()`` (what must be equal to continue the order);
    ``load_state_dict`` refuses a checkpoint whose settings differ, naming them and ``RESUME_HINT``. Subclasses
    call ``begin_epoch`` at the start of ``__iter__``, count ``served`` batches and define ``__len__``.
    """

    RESUME_HINT = "Resume with the data settings the run started with."

    def __init__(self, epoch_fn: Callable[[], int] | None = None):
        self.epoch_fn = epoch_fn
        self.epoch = 0  # the epoch the next iteration serves
        self.skip = 0  # batches of that epoch already trained on (set by load_state_dict)
        self.current: int | None = None  # the epoch being iterated, and how many of its batches were handed out
        self.served = 0

    def settings(self) -> dict[str, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def begin_epoch(self) -> tuple[int, int]:
        """``(epoch, first batch)`` of the iteration that starts now; the next one starts an epoch later."""
        if self.epoch_fn is not None and self.epoch_fn() != self.epoch:
            self.epoch, self.skip = self.epoch_fn(), 0
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        self.current, self.served = epoch, skip
        return epoch, skip

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch"}``: where the next batch comes from; plus what must match on resume."""
        if self.current is None:
            epoch, batch = self.epoch, self.skip
        elif self.served >= len(self):  # the epoch was served completely: the next one starts at 0
            epoch, batch = self.current + 1, 0
        else:
            epoch, batch = self.current, self.served
        return {"epoch": epoch, "batch": batch, **self.settings()}

    def load_state_dict(self, state: Mapping) -> None:
        now = self.settings()
        changed = [k for k, v in now.items() if k in state and int(state[k]) != v]
        if changed:
            raise ConfigError(
                "The checkpoint's batch order cannot be continued: "
                + ", ".join(f"{k} was {state[k]}, now {now[k]}" for k in changed)
                + f". {self.RESUME_HINT}"
            )
        self.epoch, self.skip = int(state["epoch"]), int(state["batch"])
        self.current, self.served = None, 0


class TensorBatchLoader(LoaderPosition):
    """Iterates over an in-memory split a whole batch at a time (one slice or gather per tensor).

    Shuffling uses its own generator seeded by ``seed`` and the epoch counter, so a run is
    reproducible and independent of the global RNG state. Under data-parallel training each rank
    takes a disjoint share of every epoch's permutation.

    Resumable: epoch e's order is a function of ``(seed, e)`` alone, and the state (``state_dict``,
    saved by Lightning in every checkpoint, given back by ``load_state_dict`` when it resumes inside an
    epoch) is the position of the next batch, ``(epoch, batch)``; so a run killed in the middle of an
    epoch continues with exactly the batches it had not trained on yet, in the same order. Lightning
    asks a sized loader for exactly one batch per training step (no prefetch), so the batches handed
    out are the batches trained on when a checkpoint is taken at the end of a step. ``epoch_fn``
    (the datamodule passes the trainer's epoch) names the epoch each iteration serves: Lightning does
    not restore the loader's state when it resumes from an end-of-epoch checkpoint, so a counter of
    our own would restart at epoch 0's order there.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        epoch_fn: Callable[[], int] | None = None,
    ):
        super().__init__(epoch_fn)
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        n = num_rows(split)
        self._rows = n // world_size if world_size > 1 else n

    def __len__(self) -> int:
        full, rest = divmod(self._rows, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self) -> Iterator[dict]:
        # a generator: none of this runs before the first batch is requested (Lightning creates the
        # iterator before the epoch starts, and once just to check the loader is iterable)
        epoch, skip = self.begin_epoch()
        n = num_rows(self.split)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = None
        if self.world_size > 1:
            order = torch.arange(n) if order is None else order
            order = order[self.rank : self._rows * self.world_size : self.world_size]
        for b in range(skip, len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self._rows)
            self.served = b + 1
            yield gather(self.split, slice(lo, hi) if order is None else order[lo:hi])

    RESUME_HINT = "Resume with the data settings the run started with (data.batch_size, the dataset size, seed)."

    def settings(self) -> dict[str, int]:
        return {"batch_size": self.batch_size, "rows": self._rows, "seed": self.seed}


class TabularDataModule(pl.LightningDataModule):
    """Base for in-memory datasets. Subclasses implement ``load() -> Splits`` (data/spec.py).

    ``tasks`` is the dict from the data config ``{name: {kind: ..., ...}}``; it is validated here, at
    construction, so a bad value stops the run before anything is trained or tracked.
    """

    def __init__(
        self, tasks: Mapping, batch_size: int = 256, eval_batch_size: int | None = None, shuffle_seed: int = 0
    ):
        super().__init__()
        self.batch_size = checks.positive_int("data.batch_size", batch_size)
        eval_batch_size = checks.optional(checks.positive_int, "data.eval_batch_size", eval_batch_size)
        self.tasks: dict[str, Task] = build_tasks(tasks)
        self.eval_batch_size = eval_batch_size or 4 * self.batch_size
        self.shuffle_seed = int(shuffle_seed)  # the run's seed; a dataset's own `seed` fixes its content
        self.splits: dict[str, Split] | None = None
        self.feature_spec: FeatureSpec | None = None
        self.item_info: ItemInfo | None = None  # set by datasets with an item catalogue, in load()
        self.catalog = None  # a data.catalog.Catalog, set in load() by datasets that can serve recommendations
        self.segments: tuple[str, ...] = ()  # warm / cold_user / cold_item: evaluation segments (after setup)
        # a task is observed where another task's 0/1 label says so
        gates = [n for n, t in self.tasks.items() if t.label_type is LabelType.BINARY]
        for name, task in self.tasks.items():
            if task.observed_if is not None and task.observed_if not in gates:
                raise ConfigError(
                    f"data.tasks.{name}.observed_if={task.observed_if!r} must name another binary task of this "
                    f"config (its label says whether {name}'s label exists), one of "
                    f"{[n for n in gates if n != name]}."
                )

    def load(self) -> Splits:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:  # idempotent: the pipeline sets up early to fail fast, Lightning again
            return
        train, val, test, self.feature_spec = self.load()
        self.splits = {"train": train, "val": val, "test": test}
        for name, split in self.splits.items():
            if num_rows(split) == 0:
                raise DataError(f"The {name} split is empty; use more samples or larger split fractions.")
        for task_name, task in self.tasks.items():
            # before the model exists: a retrieval head learns the catalogue size, a multiclass task its classes
            task.setup(train["labels"][task_name], self.item_info)
            if "user_id" in train:
                task.group_by = "user_id"
                if "item_id" in train:
                    task.set_train_interactions(train["user_id"], train["item_id"])
        for name, split in self.splits.items():
            for task_name, task in self.tasks.items():
                task.validate_labels(split["labels"][task_name], split=name)
        seen, present = self.seen_ids(), []
        for name in ("val", "test"):
            # a segment of a handful of rows (a random split's few unseen users) gives noise, not a measurement
            masks = {
                k: m for k, m in segment_masks(self.splits[name], seen).items() if int(m.sum()) >= MIN_SEGMENT_ROWS
            }
            if masks:
                self.splits[name]["segments"] = masks
                present += [k for k in masks if k not in present]
        self.segments = tuple(present)

    def seen_ids(self) -> dict[str, Tensor]:
        """The user and item ids of the training split (sorted, unique), for the id keys batches carry."""
        train = self.splits["train"]
        return {key: torch.unique(train[key]) for key in ID_KEYS if key in train}

    def _loader(self, split: str, train: bool) -> TensorBatchLoader:
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return TensorBatchLoader(
            self.splits[split],
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.shuffle_seed,
            rank=rank,
            world_size=world,
            epoch_fn=(lambda: trainer.current_epoch) if train and trainer is not None else None,
        )

    def train_dataloader(self) -> TensorBatchLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> TensorBatchLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorBatchLoader:
        return self._loader("test", train=False)
