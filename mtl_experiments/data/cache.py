"""Preprocessing real files once (DESIGN.md §2): the result is saved under ``cache_dir``, keyed by the sha256 of
every file read plus the preprocessing config, so a second run loads it in about a second instead of parsing.

``CachedDataModule`` is the base of the datasets read from files (data/census_income.py, data/movielens.py,
data/kuairand.py): a subclass says which files it reads (``files``), what besides them shapes the tensors
(``preprocessing_config``), how it builds its cache entry (``preprocess``, plain containers and tensors only, so
``torch.load(weights_only=True)`` can read it) and how it turns an entry into the splits (``_unpack``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from mtl_experiments.data.base import TabularDataModule
from mtl_experiments.data.spec import Splits

log = logging.getLogger(__name__)

Files = Mapping[str, Path | Sequence[Path]]  # {key: one file, or several read as one table}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(files: Files, config: Mapping) -> str:
    """sha256 over the files' names and contents plus the preprocessing config (a key's entry: ``[name, sha256]``
    for one file, a list of them for several)."""

    def entry(p: Path) -> list[str]:
        return [p.name, file_sha256(p)]

    blob = {k: entry(v) if isinstance(v, Path) else [entry(p) for p in v] for k, v in sorted(files.items())}
    return hashlib.sha256(json.dumps({"files": blob, "config": config}, sort_keys=True).encode()).hexdigest()[:32]


def cached(path: Path | None, build: Callable[[], dict], name: str) -> dict:
    """``build()``, saved to ``path`` (atomically) and loaded from there next time; ``path=None``: no cache."""
    if path is not None and path.is_file():
        try:
            data = torch.load(path, weights_only=True)
            log.info("%s: loaded the preprocessed data from the cache %s", name, path)
            return data
        except Exception as e:  # a truncated or foreign file: rebuild it
            log.warning("%s: ignoring unreadable cache file %s (%s)", name, path, e)
    data = build()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, path)  # a concurrent run never reads half a file
        log.info("%s: cached the preprocessed data in %s", name, path)
    return data


class CachedDataModule(TabularDataModule):
    """A dataset of files under ``root``, preprocessed once into ``<cache_dir>/<CACHE_PREFIX>-<key>.pt``
    (``cache: false`` or ``cache_dir: null``: parsed every time). ``NAME`` names the dataset in log lines.

    After ``setup()``, ``vocabularies`` (``{column: [values of ids 1..K]}``) and ``numeric_stats``
    (``{column: [mean, std]}``) say how the inputs were encoded.
    """

    NAME = ""
    CACHE_PREFIX = ""

    def __init__(self, tasks: Mapping, root: str, cache: bool = True, cache_dir: str | None = None, **kwargs):
        super().__init__(tasks=tasks, **kwargs)
        self.root = Path(str(root)).expanduser()
        self.cache = bool(cache)
        self.cache_dir = Path(str(cache_dir)).expanduser() if cache_dir else None
        self.vocabularies: dict[str, list[str]] | None = None
        self.numeric_stats: dict[str, list[float]] | None = None

    def files(self) -> Files:
        """The files to read (a DataError naming the path and how to get it for a missing one)."""
        raise NotImplementedError

    def preprocessing_config(self) -> dict:
        """Everything besides the files that changes the preprocessed tensors (part of the cache key)."""
        raise NotImplementedError

    def preprocess(self, files: Files) -> dict:
        """The files -> the cache entry."""
        raise NotImplementedError

    def _unpack(self, data: dict) -> Splits:
        """A cache entry -> ``Splits``; sets ``vocabularies`` and ``numeric_stats``."""
        raise NotImplementedError

    def load(self) -> Splits:
        files = self.files()
        path = None
        if self.cache and self.cache_dir is not None:
            path = self.cache_dir / f"{self.CACHE_PREFIX}-{cache_key(files, self.preprocessing_config())}.pt"
        return self._unpack(cached(path, lambda: self.preprocess(files), self.NAME))
