"""``data=stream``: train on a log of Parquet shards larger than memory, read a row group at a time with pyarrow.

The column config is ``data=tabular``'s (``categorical``, ``numeric``, ``id_columns``, ``timestamp_column``,
``tasks``); conf/data/stream.yaml's defaults read ``scripts/make_log.py``'s output. Before training, one pass over
every shard (data/stream/stats.py; cached next to the data, keyed by the shards' names, sizes and mtimes) fits the
vocabularies and statistics on the training rows, counts each row group's rows per split and checks every label:
a bad shard is a DataError naming the shard and the column. Splits need no index (data/stream/shards.py:
``RowSplit``): ``random`` and the warm rows of ``cold_user`` / ``cold_item`` by a hash of the row's shard and
position, the cold users / items by a hash of their id, ``temporal`` by two timestamp cuts (shares of the time
span), ``shards`` by file name. Batches (data/spec.py's contract) come from data/stream/loader.py: exactly once
per epoch across DDP ranks and DataLoader workers, equal batch counts per rank, seeded shard order and shuffle
buffer, resumable inside an epoch. Evaluation segments (warm / cold_user / cold_item) exist under the cold
splits. ``auroc_bins`` gives the binary tasks a binned AUROC (metrics/binned.py) that keeps counts, not
predictions, and drops the grouped AUC (which keeps every prediction) for bounded memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pyarrow as pa
import torch
from torch import Tensor

from mtl_experiments import checks
from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.data.spec import FeatureSpec, ItemInfo, LabelType
from mtl_experiments.data.stream.loader import StreamLoader
from mtl_experiments.data.stream.shards import RowSplit, list_shards, open_shards, time_range
from mtl_experiments.data.stream.stats import Columns, Encoder, as_arrow, cache_key, load_or_build, run_pass
from mtl_experiments.errors import ConfigError

SPLITS = ("random", "temporal", "cold_user", "cold_item", "shards")
COLD = {"cold_user": "user_id", "cold_item": "item_id"}


class StreamSource:
    """What the loaders (and their worker processes) read: the shards, how to split and encode their rows, the
    rows per split and row group, and which ids training saw (the evaluation segments)."""

    def __init__(self, fs, shards, columns: Columns, split_rule: RowSplit, stats: dict, encoder: Encoder, **options):
        self.fs, self.shards, self.columns, self.split_rule, self.encoder = fs, shards, columns, split_rule, encoder
        self.counts = stats["counts"]
        self.shuffle_buffer, self.on_bad_shard = options["shuffle_buffer"], options["on_bad_shard"]
        self.segment_names: tuple[str, ...] = options["segments"]
        self.seen: dict[str, Tensor] = {}
        for role, column in columns.id_columns.items():
            mask = torch.zeros(encoder.cardinality(column), dtype=torch.bool)
            mask[torch.from_numpy(encoder.ids(pa.chunked_array([as_arrow(stats["seen"][role])]), column))] = True
            mask[0] = False
            self.seen[role] = mask

    def rows(self, split: str) -> int:
        code = ("train", "val", "test").index(split)
        return int(sum(g[code] for groups in self.counts.values() for g in groups))

    def segments_of(self, split: str):
        return None if split == "train" or not self.segment_names else self.segments

    def segments(self, batch: dict) -> dict[str, Tensor]:
        cold = {f"cold_{role[:-3]}": ~self.seen[role][batch[role]] for role in self.seen}
        warm = ~torch.stack(list(cold.values())).any(0)
        return {k: v for k, v in {"warm": warm, **cold}.items() if k in self.segment_names}


class StreamDataModule(TabularDataModule):
    """Parquet shards streamed in bounded memory; the options are conf/data/stream.yaml's (see its comments)."""

    def __init__(
        self,
        path: str,
        tasks: Mapping,
        categorical: Sequence[str] = (),
        numeric: Sequence[str] = (),
        id_columns: Mapping[str, str] | None = None,
        timestamp_column: str | None = None,
        row_id_column: str | None = None,
        hash_buckets: Mapping[str, int] | None = None,
        split: str = "random",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        cold_fraction: float = 0.1,
        val_shards: Sequence[str] = (),
        test_shards: Sequence[str] = (),
        shuffle_buffer: int = 65536,
        num_workers: int = 0,
        on_bad_shard: str = "stop",
        cache_dir: str | None = None,
        auroc_bins: int | None = None,
        **kwargs,
    ):
        super().__init__(tasks=tasks, **kwargs)
        if not path:
            raise ConfigError(
                "data.path must name a directory, glob or URI of Parquet shards, got null "
                "(e.g. data.path=log after `python scripts/make_log.py --rows 1000000 --shards 10 --out log`)."
            )
        self.path = str(path)
        self.columns = self._columns(
            tasks, categorical, numeric, id_columns or {}, timestamp_column, row_id_column, hash_buckets or {}
        )
        self.split_rule = self._split_rule(split, val_fraction, test_fraction, cold_fraction, val_shards, test_shards)
        self.shuffle_buffer = checks.non_negative_int("data.shuffle_buffer", shuffle_buffer)
        self.num_workers = checks.non_negative_int("data.num_workers", num_workers)
        self.on_bad_shard = checks.choice("data.on_bad_shard", on_bad_shard, ("stop", "skip"))
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None
        bins_hint = "score bins of [0, 1], e.g. 10000"  # >= 2, as the schema and BinnedAUROC require
        self.auroc_bins = checks.optional(checks.integer, "data.auroc_bins", auroc_bins, low=2, hint=bins_hint)
        self.source: StreamSource | None = None
        self.split_rows: dict[str, int] = {}
        self.rows_skipped = 0  # rows of shards the statistics pass could not read (on_bad_shard=skip)

    def _columns(self, tasks, categorical, numeric, id_columns, timestamp, row_id, hash_buckets) -> Columns:
        for name, task in self.tasks.items():
            if task.label_type is LabelType.ITEM or (
                task.label_type is LabelType.CLASS and getattr(task, "num_classes", None) is None
            ):
                raise ConfigError(
                    f"data.tasks.{name} must be binary, regression or multiclass with "
                    f"num_classes set under data=stream, got kind {task.kind!r} (a streamed log has no "
                    "catalogue or class list to fit)."
                )
        categorical = list(categorical)
        categorical += [c for c in id_columns.values() if c not in categorical]
        bad = {k: v for k, v in id_columns.items() if k not in COLD.values()}
        if bad:
            checks.fail("data.id_columns", "{user_id: <column>, item_id: <column>}", bad)
        buckets = {c: checks.positive_int(f"data.hash_buckets.{c}", n) for c, n in hash_buckets.items()}
        unknown = sorted(set(buckets) - set(categorical))
        if unknown:
            checks.fail("data.hash_buckets", "keyed by categorical columns", unknown, hint="list them in categorical")
        labels = {name: task.label for name, task in self.tasks.items()}
        return Columns(tuple(categorical), tuple(numeric), labels, dict(id_columns), timestamp, buckets, row_id)

    def _split_rule(self, split, val_fraction, test_fraction, cold_fraction, val_shards, test_shards) -> RowSplit:
        split = checks.choice("data.split", split, SPLITS)
        fractions = {
            k: checks.fraction(f"data.{k}", v)
            for k, v in {
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "cold_fraction": cold_fraction,
            }.items()
        }
        if split != "shards" and fractions["val_fraction"] + fractions["test_fraction"] >= 1:
            checks.fail(
                "data.val_fraction + data.test_fraction",
                "< 1 (training keeps the rest)",
                fractions["val_fraction"] + fractions["test_fraction"],
            )
        if split == "temporal" and not self.columns.timestamp:
            raise ConfigError("data.split=temporal needs data.timestamp_column, got null.")
        id_column = self.columns.id_columns.get(COLD.get(split, ""))
        if split in COLD and id_column is None:
            raise ConfigError(f"data.split={split} needs data.id_columns.{COLD[split]}, got none.")
        if split == "shards" and not (val_shards and test_shards):
            raise ConfigError("data.split=shards needs data.val_shards and data.test_shards (file names).")
        return RowSplit(
            split, id_column=id_column, val_shards=tuple(val_shards), test_shards=tuple(test_shards), **fractions
        )

    def setup(self, stage: str | None = None) -> None:
        if self.source is not None:
            return
        fs, files = list_shards(self.path)
        types = {c: "any" for c in self.columns.categorical}
        types |= {c: "number" for c in (*self.columns.numeric, *self.columns.labels.values())}
        shards = open_shards(fs, files, types | {c: "any" for c in (self.columns.timestamp, self.columns.row_id) if c})
        rule = self._resolve_split(fs, shards)
        cache = self.cache_dir or (Path(files[0]).parent / "_mtl_stream" if "://" not in self.path else None)
        key = cache_key(shards, self.columns, rule)
        skip = self.on_bad_shard == "skip"
        stats = load_or_build(cache, key, lambda: run_pass(fs, shards, self.columns, rule, self.tasks, skip))
        encoder = Encoder(self.columns, stats, self.tasks)
        segments = ("warm", f"cold_{COLD[rule.mode][:-3]}") if rule.mode in COLD else ()
        self.source = StreamSource(
            fs,
            shards,
            self.columns,
            rule,
            stats,
            encoder,
            shuffle_buffer=self.shuffle_buffer,
            on_bad_shard=self.on_bad_shard,
            segments=segments,
        )
        self.segments = segments
        self.rows_skipped = int(sum(stats["skipped"].values()))
        self.split_rows = {s: self.source.rows(s) for s in ("train", "val", "test")}
        self.splits = dict.fromkeys(self.split_rows)  # no tensors: the rows stay on disk
        for name, n in self.split_rows.items():
            if n == 0:
                raise ConfigError(
                    f"the {name} split of data.path={self.path} is empty; adjust data.split / "
                    "data.val_fraction / data.test_fraction (or add shards)."
                )
        self.feature_spec = FeatureSpec(
            numeric=self.columns.numeric,
            categorical={c: encoder.cardinality(c) for c in self.columns.categorical},
            id_columns=dict(self.columns.id_columns),
        )
        if "item_id" in self.columns.id_columns:
            self.item_info = ItemInfo(num_items=encoder.cardinality(self.columns.id_columns["item_id"]) - 1)
        for task in self.tasks.values():
            if "user_id" in self.columns.id_columns and self.auroc_bins is None:
                task.group_by = "user_id"  # grouped AUC keeps every prediction: not with binned AUROC
            if hasattr(task, "auroc_bins"):
                task.auroc_bins = self.auroc_bins

    def _resolve_split(self, fs, shards) -> RowSplit:
        rule = self.split_rule
        names = {s.name for s in shards}
        missing = sorted(set(rule.val_shards + rule.test_shards) - names)
        if missing:
            checks.fail("data.val_shards / data.test_shards", "names of shards in data.path", missing)
        if rule.mode != "temporal":
            return rule
        low, high = time_range(fs, shards, self.columns.timestamp)
        span = high - low
        return RowSplit(
            "temporal",
            rule.val_fraction,
            rule.test_fraction,
            rule.cold_fraction,
            val_from=low + (1 - rule.val_fraction - rule.test_fraction) * span,
            test_from=low + (1 - rule.test_fraction) * span,
        )

    def seen_ids(self) -> dict[str, Tensor]:
        return {role: torch.nonzero(mask).squeeze(1) for role, mask in self.source.seen.items()}

    def _loader(self, split: str, train: bool) -> StreamLoader:
        self.setup()
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        return StreamLoader(
            self.source,
            split,
            self.batch_size if train else self.eval_batch_size,
            seed=self.shuffle_seed,
            shuffle=train,
            rank=rank,
            world=world,
            workers=self.num_workers,
            epoch_fn=(lambda: trainer.current_epoch) if train and trainer is not None else None,
            on_epoch_end=self.log_epoch if train else None,
            agree=self.all_ranks_have if world > 1 and self.on_bad_shard == "skip" else None,
        )

    def all_ranks_have(self, batch: bool) -> bool:
        """Whether every rank has a next batch (a collective: every rank calls it before each of its batches)."""
        strategy = self.trainer.strategy
        flag = torch.tensor([float(batch)], device=strategy.root_device)
        return bool(strategy.reduce(flag, reduce_op="min").item() > 0)

    def log_epoch(self, counts: Mapping[str, int]) -> None:
        """``data/rows_read``, ``data/rows_skipped`` (bad shards' rows, whole-job), ``data/rows_dropped``."""
        trainer = self.trainer
        if trainer is None:
            return
        local = torch.tensor([counts["rows_read"], counts["rows_skipped"]], dtype=torch.float64)
        if trainer.world_size > 1:  # every rank ends its epoch here, after the same number of batches
            local = trainer.strategy.reduce(local.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        values = {
            "data/rows_read": float(local[0]),
            "data/rows_skipped": float(local[1]) + self.rows_skipped,
            "data/rows_dropped": float(counts["rows_dropped"]),
        }
        for logger in trainer.loggers if trainer.is_global_zero else ():
            logger.log_metrics(values, step=trainer.global_step)
        self.last_epoch_counts = values
