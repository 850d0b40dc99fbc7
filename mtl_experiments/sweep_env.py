"""The environment variables through which a sweep's parent run reaches its jobs.

A module of its own, importing nothing heavy: Hydra builds ``sweep.MLflowSweepCallback`` before any job, so
anything it imports at module level is paid by every start, a config error's included (issue 17: <= 2 s).
"""

PARENT_RUN_ENV = "MTL_PARENT_RUN_ID"  # the sweep's parent run id, set by sweep.MLflowSweepCallback for its jobs
SWEPT_ENV = "MTL_SWEPT_KEYS"  # the sweep's swept keys, comma-separated, set with PARENT_RUN_ENV for its jobs
