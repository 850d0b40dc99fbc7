"""The one early config check (mtl_experiments/schema.py): every bad input a tester tried (issue 16) and more is one
line naming the key and the fix, exit code 2 from the CLI, nothing recorded; every config option passes it."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_experiments import schema
from mtl_experiments.errors import ConfigError
from tests.conftest import CONF, ROOT, options

PARSER = OverridesParser.create()


@functools.cache
def composed(choices: tuple[str, ...]) -> DictConfig:
    """The config ``train.py <choices>`` composes (cached: composing costs ~0.3 s, a check microseconds)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=list(choices), return_hydra_config=True)


def config(*overrides: str) -> DictConfig:
    """Group choices (``loss=fixed``) composed by Hydra; values parsed by Hydra's own override parser and set as
    Hydra sets them (``+key`` adds a key, as on the command line)."""
    choices = tuple(o for o in overrides if "." not in o.split("=")[0].lstrip("+~"))
    cfg = composed(choices).copy()
    for override in PARSER.parse_overrides([o for o in overrides if o not in choices]):
        if not override.is_add():
            # Hydra refuses a new key without + (test_split_on_a_dataset_without_splits_names_those_with_them)
            assert OmegaConf.select(cfg, override.key_or_group, default=PARSER) is not PARSER, override.input_line
        with open_dict(cfg):
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    return cfg


def refusal(*overrides: str) -> str:
    cfg = config(*overrides)
    with pytest.raises(ConfigError) as err:
        schema.validate(cfg, dict(cfg.hydra.runtime.choices))
    return str(err.value)


# (overrides, what the one line must name: the key and the fix); issue 16's list first, then more
BAD_INPUTS = [
    (["trainer.accelerator=tpu"], ["trainer.accelerator must be one of", "got 'tpu'", "trainer=gpu"]),
    (["trainer.max_epochs=two"], ["trainer.max_epochs must be an integer", "got 'two'", "trainer.max_epochs=20"]),
    (["trainer.max_epochs=-5"], ["trainer.max_epochs must be", "got -5", "-1: until early stopping"]),
    (["optimizer.lr=fast"], ["optimizer.lr must be a finite number > 0, got 'fast'", "optimizer.lr=0.001"]),
    (["optimizer.lr=-0.1"], ["optimizer.lr must be a finite number > 0, got -0.1", "optimizer.lr=0.001"]),
    (["optimizer.weight_decay=-1"], ["optimizer.weight_decay must be a finite number >= 0", "0 disables it"]),
    (["seed=abc"], ["seed must be an integer in [0, 4294967295], got 'abc'", "seed=0"]),
    (["data.batch_size=abc"], ["data.batch_size must be an integer >= 1, got 'abc'", "e.g. 256"]),
    (["data.correlation=abc"], ["data.correlation must be a number in [-1, 1], got 'abc'", "cosine"]),
    (["loss=fixed", "loss.weights=[1,2]"], ["loss.weights must be a mapping", "loss.weights={y1: 1.0, y2: 2.0}"]),
    (["+data.split=cold_user"], ["data.split is not a setting of data=synthetic", "data=kuairand, movielens"]),
    (["+data.tasks.nxt={kind: retrieval}"], ["data.tasks.nxt.kind=retrieval needs item ids", "use data=kuairand"]),
    (["backbone=mmoe", "backbone.num_experts=2.5"], ["backbone.num_experts must be an integer >= 1, got 2.5"]),
    (["module.gradient_clip_val=-0.5"], ["module.gradient_clip_val must be a finite number >= 0", "0: off"]),
    (["trainer.devices=0"], ["trainer.devices must be a number of devices >= 1", "trainer.devices=1"]),
    (["+trainer.precision=8"], ["trainer.precision must be one of", "bf16-mixed"]),
    (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps must be an integer >= 1", "e.g. 50"]),
    (["trainer.min_epochs=5", "trainer.max_epochs=2"], ["trainer.min_epochs=5 exceeds trainer.max_epochs=2"]),
    (["+trainer.gradient_clip_val=1.0"], ["trainer.gradient_clip_val must be one of [None]", "module.gradient_clip"]),
    (["+trainer.limit_train_batches=1.5"], ["trainer.limit_train_batches must be a fraction in [0, 1]"]),
    (["optimizer=sgd", "optimizer.momentum=1.5"], ["optimizer.momentum must be a number in [0, 1)", "e.g. 0.9"]),
    (["optimizer=sparse_adam", "optimizer.betas=[0.9]"], ["optimizer.betas must be two numbers", "[0.9, 0.999]"]),
    (["scheduler=plateau", "scheduler.scheduler.patience=-1"], ["scheduler.scheduler.patience must be an integer"]),
    (["scheduler=cosine", "trainer.max_epochs=-1"], ["scheduler.scheduler.T_max must be an integer >= 1, got -1"]),
    (["scheduler.interval=hour"], ["scheduler.interval must be one of ['epoch', 'step']"]),
    (["features.embedding_dim=0"], ["features.embedding_dim must be an integer >= 1, got 0", "e.g. 8"]),
    (["features.new_users=zero"], ["features.new_users must be one of ['random', 'mean', 'features']"]),
    (["module.nonfinite=ignore"], ["module.nonfinite must be one of ['stop', 'skip']"]),
    (["callbacks.early_stopping.patience=-1"], ["callbacks.early_stopping.patience must be an integer >= 0"]),
    (["optimized_metric=test/mean_auroc"], ["optimized_metric='test/mean_auroc' is not a validation", "never select"]),
    (["optimized_mode=best"], ["optimized_mode must be one of", "leave optimized_mode=auto"]),
    (["experiment_name=''"], ["experiment_name must be a non-empty string", "experiment_name=my-study"]),
    (["data.tasks.y1.kind=ranking"], ["data.tasks.y1.kind must be one of", "valid kinds are"]),
    (["data.num_samples=2.5"], ["data.num_samples must be an integer >= 0, got 2.5"]),
    (["backbone.dropout=1.0"], ["backbone.dropout must be a number in [0, 1), got 1.0"]),
    (["backbone=mmoe", "backbone.expert_dims=[]"], ["backbone.expert_dims must be a non-empty list", "[64, 32]"]),
    (["data=tabular", "data.split=cold_user"], ["data.split=cold_user holds users out", "data.id_columns.user_id"]),
    (["data=tabular", "data.tasks={n: {kind: retrieval}}"], ["kind=retrieval names items", "id_columns.item_id"]),
    (["data=census_income", "+data.tasks.n={kind: retrieval}"], ["needs item ids, which data=census_income"]),
    (["loss=fixed", "loss.weights={y1: 1, clicks: 2}"], ["loss.weights names unknown task(s) ['clicks']", "{y1:1.0"]),
    (["loss=graddrop", "loss.leak={y3: 0.5}"], ["loss.leak names unknown task(s) ['y3']; the tasks are ['y1', 'y2']"]),
    # option-specific keys (schema_options.OPTIONS), caught before torch is imported
    (["loss=dwa", "loss.temperature=-1"], ["loss.temperature must be a finite number > 0, got -1", "uses 2"]),
    (["loss=cagrad", "loss.rescale=3"], ["loss.rescale must be one of [0, 1, 2], got 3"]),
    (["loss=pcgrad", "loss.grad_source=inputs"], ["loss.grad_source must be one of ['params', 'representation']"]),
    (["loss=rlw", "loss.seed=-2"], ["loss.seed must be an integer in [0, 4294967295], got -2", "the run's seed"]),
    (["loss=graddrop", "loss.leak={y1: 1.5}"], ["loss.leak.y1 must be a number in [0, 1], got 1.5"]),
    (["backbone=cross_stitch", "backbone.alpha_self=2"], ["backbone.alpha_self must be a number in [0, 1], got 2"]),
    (["data=recsys_synthetic", "data.click_rate=1.0"], ["data.click_rate must be a number in (0, 1), got 1.0"]),
    (["data=kuairand", "data.logs=weekly"], ["data.logs must be 'standard', 'random', 'all' or a list", "'weekly'"]),
    (["data=movielens", "data.split=by_time"], ["data.split must be one of ['random', 'cold_user',", "temporal"]),
    (["data=stream", "data.split=by_day"], ["data.split must be one of", "'shards'", "data.val_shards"]),
    (["data=stream", "data.auroc_bins=1"], ["data.auroc_bins must be an integer >= 2, got 1", "score bins"]),
    (["data=tabular", "data.numeric=age"], ["data.numeric must be a list of names, got 'age'", "[age, city]"]),
    (["data.scale=0"], ["data.scale must be a finite number > 0, got 0"]),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_key_and_the_fix(overrides, expected):
    message = refusal(*overrides)
    assert "\n" not in message and message.endswith("."), message
    for part in expected:
        assert part in message, (part, message)


def option_node(group: str, option: str) -> DictConfig:
    """``conf/<group>/<option>.yaml`` as Hydra places it: over the options its defaults list names."""
    node = OmegaConf.load(CONF / group / f"{option}.yaml")
    bases = [option_node(group, base) for base in node.pop("defaults", [])]
    return OmegaConf.merge(*bases, node)


@pytest.mark.parametrize("group", ["data", "backbone", "loss", "trainer", "optimizer", "scheduler"])
def test_every_option_passes(group):
    """Every option of every group (enrolled by its YAML file) is accepted as shipped, in place of the default."""
    base = composed(())
    for option in options(group):
        cfg = base.copy()
        with open_dict(cfg):
            cfg[group] = option_node(group, option)
        schema.validate(cfg, {**base.hydra.runtime.choices, group: option})


@pytest.mark.parametrize("group", ["experiment", "hparams_search"])
def test_every_global_option_passes(group):
    """Options that set keys of several groups (``# @package _global_``), composed by Hydra as the CLI does."""
    for path in sorted((CONF / group).rglob("*.yaml")):
        cfg = composed((f"{group}={path.relative_to(CONF / group).with_suffix('').as_posix()}",))
        schema.validate(cfg, dict(cfg.hydra.runtime.choices))


@pytest.mark.parametrize("group", ["trainer", "optimizer", "scheduler", "module"])
def test_every_key_of_the_typed_groups_has_a_rule(group):
    rules = schema.GROUPS[group]
    for path in sorted((CONF / group).glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        keys = [str(k) for k in node if k != "defaults"]
        keys += [f"{k}.{sub}" for k in keys if isinstance(node[k], dict) for sub in node[k]]
        missing = [k for k in keys if k not in rules]
        assert not missing, f"conf/{group}/{path.name}: no rule in schema.{group.upper()} for {missing}"


@pytest.mark.parametrize("group", ["data", "backbone", "loss"])
def test_every_key_of_every_option_has_a_rule(group):
    """Each key of each ``conf/<group>/*.yaml`` is judged before torch is imported: its option's own rule
    (``schema_options.OPTIONS``) or one every option of the group shares (``schema.SHARED``)."""
    for option in options(group):
        keys = [str(k) for k in option_node(group, option) if not str(k).startswith("_")]
        missing = [k for k in keys if schema.key_rule(group, option, k) is None]
        assert not missing, f"conf/{group}/{option}.yaml: no rule in schema_options or SHARED for {missing}"


@pytest.mark.parametrize("data", options("data"))
def test_debug_fast_works_with_every_dataset(data, tiny_data):
    """``debug=fast`` sets no dataset-specific key (it once set data.num_samples, which only data=synthetic takes):
    each dataset's node with debug=fast's ``data`` part merged in passes, and is built where tiny files exist."""
    from mtl_experiments.pipeline import build

    cfg = composed(("debug=fast",)).copy()
    debug = OmegaConf.load(CONF / "debug" / "fast.yaml")
    with open_dict(cfg):
        cfg.data = OmegaConf.merge(option_node("data", data), debug.get("data", {}))
    schema.validate(cfg, {**cfg.hydra.runtime.choices, "data": data})
    assert cfg.trainer.limit_train_batches == 20
    try:
        values = tiny_data(data)
    except KeyError:  # no tiny files for it in tests/conftest.py: the check above is what debug=fast needs
        return
    for override in PARSER.parse_overrides(values):
        with open_dict(cfg):
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    build(cfg, "data")


def test_split_on_a_dataset_without_splits_names_those_with_them():
    with pytest.raises(ConfigCompositionException) as err:
        composed(("data.split=cold_user",))
    text = f"{err.value}\n{err.value.__cause__}"
    message = schema.composition_message(text)
    assert message == (
        "data.split is not a setting of the chosen data option; data="
        + ", ".join(schema.options_with("data.split"))
        + " have it: choose one first (e.g. data=kuairand data.split=cold_user); a new key needs a leading +: "
        "+data.split=cold_user."
    )


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "train.py", *args, f"hydra.run.dir={tmp_path / 'out'}"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)


def test_cli_exit_code_2_one_line_nothing_recorded(tmp_path):
    """The composition path (a value error's path: tests/test_config_errors.py::test_cli_config_error_is_one_...)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "train.py", "data.split=cold_user", f"hydra.run.dir={tmp_path / 'out'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: data.split is not a setting"), result.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "out").exists()


def test_help_imports_neither_lightning_nor_mlflow_nor_torch():
    """``--help`` stays light (issue 17 item 4): what it imports, as Python's own import log lists it."""
    command = [sys.executable, "-X", "importtime", "train.py", "--help"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "train is powered by Hydra" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")
    }
    assert "hydra" in imported and not imported & {"lightning", "mlflow", "torch"}


# the bad values issue 16 found leaving a FAILED run in the store although nothing trained
LEFT_FAILED_RUNS = [
    "trainer.accelerator=tpu",
    "trainer.max_epochs=two",
    "optimizer.lr=fast",
    "optimizer.weight_decay=-1",
    "seed=abc",  # through train(cfg) this was Lightning's ValueError from seed_everything, before the checks
]


def test_train_refuses_before_any_run_is_recorded(make_cfg, mlflow_runs):
    """``train(cfg)`` (not only the CLI) checks the schema first: pipeline.check_startup."""
    from mtl_experiments.pipeline import train

    for override in LEFT_FAILED_RUNS:
        with pytest.raises(ConfigError, match=f"^{override.split('=')[0]} must be"):
            train(make_cfg(override))
    assert mlflow_runs() == []
