"""``hydra/sweeper=mtl_optuna``: Optuna hyper-parameter search as a Hydra sweeper (see ``optuna_sweeper.py``)."""
