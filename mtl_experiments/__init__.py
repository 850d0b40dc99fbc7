"""mtl-experiments: configuration-driven multi-task learning experiments for recommender systems."""

import secrets

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ${mtl.run_suffix:} ends hydra.run.dir / hydra.sweep.dir (conf/hydra/default.yaml): six random hex characters, one
# draw per process and cached in the config (a sweep's jobs in other processes get the sweep's value through
# Hydra's copied resolver cache), so runs launched in the same second never share an output folder. Registered on
# import: every process that composes our config (train.py, sweep workers, tests) imports this package first.
RUN_SUFFIX_RESOLVER = "mtl.run_suffix"
if not OmegaConf.has_resolver(RUN_SUFFIX_RESOLVER):
    OmegaConf.register_new_resolver(RUN_SUFFIX_RESOLVER, lambda: secrets.token_hex(3), use_cache=True)
