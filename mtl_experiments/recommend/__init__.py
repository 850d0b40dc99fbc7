"""Serve a trained model: the top-K items for given users, with each task's score and a combined ranking score
(``mtl-recommend``, ``scripts/recommend.py``).

- ``scoring``: per-task item scores, their fusion, the top-K list of a user;
- ``loading``: the model of a checkpoint or an MLflow run, rebuilt only through ``safe_config`` (no code runs from
  a shared checkpoint);
- ``cli``: the command line.
"""

from mtl_experiments.recommend.cli import build_parser, format_table, main, parse_users, parse_weights
from mtl_experiments.recommend.loading import Served, config_artifact, load_checkpoint, load_run
from mtl_experiments.recommend.scoring import FUSIONS, fuse, fusion_weights, recommend, score_items
from mtl_experiments.run_checkpoint import best_local_checkpoint

__all__ = [
    "FUSIONS",
    "Served",
    "best_local_checkpoint",
    "build_parser",
    "config_artifact",
    "format_table",
    "fuse",
    "fusion_weights",
    "load_checkpoint",
    "load_run",
    "main",
    "parse_users",
    "parse_weights",
    "recommend",
    "score_items",
]
