"""mtl-experiments: configuration-driven multi-task learning experiments for recommender systems."""

__version__ = "0.1.0"
