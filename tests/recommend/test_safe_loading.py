"""Loading never executes configuration (issue 18): crafted checkpoints and crafted run artifacts whose config names
a callable the project does not build are refused before anything is built: the marker file their code would write
never appears, ``mtl-recommend`` exits 2 with one line naming the target.

Every checkpoint here is made only of tensors and plain containers, so it passes ``torch.load(weights_only=True)``;
the code is in its config, which the old loader Hydra-instantiated as it stood."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from mtl_experiments import checkpoints, safe_config, tracking
from mtl_experiments import recommend as rec
from mtl_experiments.errors import ConfigError
from tests.conftest import fresh_store


class Payload:
    """Unpickling it opens ``path`` for writing (creating the marker): what a hostile pickle's command does."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def payload(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def opener(marker: Path, **extra) -> dict:
    return {"_target_": "builtins.open", "file": str(marker), "mode": "w", **extra}


def a_path(marker: Path) -> dict:
    return {"_target_": "pathlib.Path", "_args_": [str(marker)]}


SYNTHETIC = "mtl_experiments.data.synthetic.SyntheticDataModule"
RECSYS = "mtl_experiments.data.recsys_synthetic.RecsysSyntheticDataModule"


@dataclass(frozen=True)
class Case:
    """A crafted config (``config(marker, tmp)``: a mapping or YAML text) and the targets the refusal names."""

    config: Callable[[Path, Path], dict | str]
    names: tuple[str, ...]


def _pickle_file(marker: Path, tmp: Path) -> dict:
    (tmp / "evil.pkl").write_bytes(payload(marker))
    return {"data": {"_target_": "torch.load", "f": str(tmp / "evil.pkl"), "weights_only": False}}


def _module_on_path(marker: Path, tmp: Path) -> dict:
    (tmp / "mtl_evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return {"data": {"_target_": "importlib.import_module", "name": "mtl_evil_module"}}


CASES = {
    "torch.load-pickle-file": Case(_pickle_file, ("torch.load (at data)",)),
    "torch.load-pickle-in-checkpoint": Case(
        lambda m, t: {
            "data": {
                "_target_": "torch.load",
                "weights_only": False,
                "f": {"_target_": "io.BytesIO", "_args_": [payload(m)]},
            }
        },
        ("torch.load (at data)", "io.BytesIO (at data.f)"),
    ),
    "builtins.open": Case(lambda m, t: {"data": opener(m)}, ("builtins.open (at data)",)),
    "pathlib.Path.touch": Case(
        lambda m, t: {"data": {"_target_": "pathlib.Path.touch", "_args_": [a_path(m)]}},
        ("pathlib.Path.touch (at data)", "pathlib.Path (at data._args_[0])"),
    ),
    "pathlib.Path.write_text": Case(
        lambda m, t: {"data": {"_target_": "pathlib.Path.write_text", "_args_": [a_path(m), "pwned"]}},
        ("pathlib.Path.write_text (at data)",),
    ),
    "subprocess.run": Case(
        lambda m, t: {"data": {"_target_": "subprocess.run", "_args_": [["touch", str(m)]]}},
        ("subprocess.run (at data)",),
    ),
    "subprocess.Popen": Case(
        lambda m, t: {"data": {"_target_": "subprocess.Popen", "_args_": [["touch", str(m)]]}},
        ("subprocess.Popen (at data)",),
    ),
    "importlib.import_module": Case(_module_on_path, ("importlib.import_module (at data)",)),
    "pickle.loads": Case(
        lambda m, t: {"data": {"_target_": "pickle.loads", "_args_": [payload(m)]}}, ("pickle.loads (at data)",)
    ),
    "builtins.eval": Case(
        lambda m, t: {"data": {"_target_": "builtins.eval", "_args_": [f"open({str(m)!r}, 'w').close()"]}},
        ("builtins.eval (at data)",),
    ),
    "os.system": Case(
        lambda m, t: {"data": {"_target_": "os.system", "_args_": [f"touch {m}"]}}, ("os.system (at data)",)
    ),
    "nested-in-data.tasks": Case(
        lambda m, t: {"data": {"_target_": RECSYS, "tasks": {"click": opener(m)}}},
        ("builtins.open (at data.tasks.click)",),
    ),
    "inside-_args_": Case(
        lambda m, t: {"data": {"_target_": SYNTHETIC, "_args_": [opener(m)]}},
        ("builtins.open (at data._args_[0])",),
    ),
    "dict-inside-a-list": Case(
        lambda m, t: {"data": {"_target_": SYNTHETIC, "tasks": [{"kind": "binary"}, {"x": opener(m)}]}},
        ("builtins.open (at data.tasks[1].x)",),
    ),
    "_partial_": Case(  # the loader calls datamodule.setup(): here a partial of open
        lambda m, t: {"data": {"_target_": "types.SimpleNamespace", "setup": opener(m, _partial_=True)}},
        ("types.SimpleNamespace (at data)", "builtins.open (at data.setup)"),
    ),
    "interpolated-target": Case(
        lambda m, t: {"evil": "builtins.open", "data": {**opener(m), "_target_": "${evil}"}},
        ("builtins.open (at data)",),
    ),
    "oc.decode": Case(
        lambda m, t: {"data": f"${{oc.decode:'{{_target_: builtins.open, file: \"{m}\", mode: w}}'}}"},
        ("builtins.open (at data)",),
    ),
    "non-string-target": Case(lambda m, t: {"data": {"_target_": 42}}, ("42 (at data)",)),
}
# recipes (target-free descriptions composed through Hydra): an override can still set a target
RECIPES = {
    "recipe:data._target_": Case(
        lambda m, t: ["data=recsys_synthetic", "data._target_=builtins.open"], ("builtins.open (at data)",)
    ),
    "recipe:+data.tasks": Case(
        lambda m, t: ["data=recsys_synthetic", "~data.tasks", f"+data.tasks={{_target_:builtins.open,file:'{m}'}}"],
        ("builtins.open (at data.tasks)",),
    ),
}


def as_yaml(config: dict | str) -> str:
    return config if isinstance(config, str) else OmegaConf.to_yaml(OmegaConf.create(config))


def crafted_checkpoint(path: Path, config: str | None = None, recipe: list[str] | None = None) -> Path:
    """A checkpoint of plain containers and one tensor, carrying ``config`` and/or a recipe."""
    mtl = {"config": config, **({"recipe": {"overrides": recipe}} if recipe is not None else {})}
    torch.save({"state_dict": {"model.w": torch.zeros(1)}, "mtl": mtl}, path)
    checkpoints.load(path)  # it passes weights_only=True
    return path


def craft(case_id: str, tmp: Path, marker: Path) -> Path:
    """The crafted checkpoint of one case."""
    if case_id in RECIPES:
        return crafted_checkpoint(tmp / "crafted.ckpt", recipe=RECIPES[case_id].config(marker, tmp))
    return crafted_checkpoint(tmp / "crafted.ckpt", config=as_yaml(CASES[case_id].config(marker, tmp)))


def refused(capsys, argv: list[str], names: tuple[str, ...]) -> str:
    """``main(argv)`` exits 2 with one ``Error:`` line naming every target."""
    capsys.readouterr()
    assert rec.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("Error: ") and "which this project does not build" in lines[0], lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """tmp_path importable, as a hostile module next to the checkpoint would be on a writable sys.path entry."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("mtl_evil_module", None)


@pytest.mark.parametrize("case_id", [*CASES, *RECIPES])
def test_crafted_checkpoint_runs_no_code(case_id, tmp_path, capsys, on_path):
    marker = tmp_path / "pwned"
    path = craft(case_id, tmp_path, marker)
    names = (CASES | RECIPES)[case_id].names
    line = refused(capsys, ["--checkpoint", str(path), "--users", "1"], names)
    assert "This checkpoint's" in line
    assert not marker.exists()


def test_the_pickle_payload_is_live(tmp_path):
    """The payload the torch.load cases carry does run when unpickled: their marker check is not vacuous."""
    pickle.loads(payload(tmp_path / "pwned"))
    assert (tmp_path / "pwned").exists()


def test_an_escaped_interpolation_cannot_come_back_to_life(tmp_path, capsys):
    """``\\${oc.decode:...}`` resolves to the text ``${oc.decode:...}``, which would be an interpolation again
    (producing a target after the check) in the config instantiated from the checked container."""
    marker = tmp_path / "pwned"
    hidden = f"\\${{oc.decode:'{{_target_: builtins.open, file: \"{marker}\", mode: w}}'}}"
    path = crafted_checkpoint(tmp_path / "crafted.ckpt", config=as_yaml({"data": hidden}))
    capsys.readouterr()
    assert rec.main(["--checkpoint", str(path), "--users", "1"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert "interpolation that survives resolution (at data)" in line
    assert not marker.exists()


def test_a_refused_recipe_never_gives_way_to_the_full_config(tmp_path):
    clean = OmegaConf.to_yaml(OmegaConf.create({"data": {"_target_": SYNTHETIC}}))
    path = crafted_checkpoint(tmp_path / "c.ckpt", config=clean, recipe=["data._target_=builtins.open"])
    with pytest.raises(ConfigError, match=r"This checkpoint's recipe names builtins.open \(at data\)"):
        rec.load_checkpoint(path)


def test_a_recipe_this_version_cannot_compose_is_a_clear_error(tmp_path):
    path = crafted_checkpoint(tmp_path / "c.ckpt", recipe=["backbone=transformer_xl", "data.num_userz=3"])
    with pytest.raises(ConfigError, match="recipe cannot be composed from this version's configs .*backbone/"):
        rec.load_checkpoint(path)
    path = crafted_checkpoint(tmp_path / "d.ckpt", recipe="data=synthetic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"recipe is not \{'overrides'"):
        rec.load_checkpoint(path)


def test_allowed_targets_are_those_of_the_shipped_configs():
    allowed = safe_config.allowed_targets()
    assert {"torch.optim.Adam", "lightning.pytorch.Trainer", RECSYS, "mtl_experiments.features.FeatureEncoder"} <= (
        allowed
    )
    assert not {"torch.load", "builtins.open", "pathlib.Path.touch", "mtl_experiments.pipeline.train"} & allowed
    shipped = set()
    for path in Path(safe_config.CONFIG_DIR).rglob("*.yaml"):
        shipped |= {
            line.split(":", 1)[1].split("#")[0].strip()
            for line in path.read_text().splitlines()
            if line.strip().startswith("_target_:")
        }
    assert allowed == shipped


def test_recipe_keeps_group_choices_and_model_overrides_only():
    choices = {
        "data": "recsys_synthetic",
        "backbone": "mmoe",
        "loss": "equal",
        "logger": "mlflow",
        "trainer": "default",
        "hydra/launcher": "basic",
        "experiment": None,
        "paths": "default",
    }
    overrides = [
        "data=recsys_synthetic",
        "seed=1",
        "data.num_users=500",
        "logger.mlflow.tracking_uri=sqlite:///x",
        "~callbacks.progress_bar",
        "trainer.max_epochs=2",
        "+data.tasks.next_item={kind: retrieval}",
        "resume=0123",
        "hydra.run.dir=/tmp/x",
        "paths.output_dir=/tmp/y",
    ]
    assert safe_config.recipe(choices, overrides) == {
        "overrides": [
            "backbone=mmoe",
            "loss=equal",
            "data=recsys_synthetic",
            "seed=1",
            "data.num_users=500",
            "+data.tasks.next_item={kind: retrieval}",
        ]
    }
    assert safe_config.recipe({}, ["seed=1"]) is None  # no Hydra record: no recipe (never the defaults)


# ----------------------------------------------------------------------------------- crafted run artifacts
RUN_CASES = ["torch.load-pickle-in-checkpoint", "builtins.open", "pathlib.Path.touch", "_partial_", "oc.decode"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, empty_store):
    root = tmp_path_factory.mktemp("crafted-runs")
    uri = fresh_store(empty_store, root / "mlflow.db")
    client = MlflowClient(uri)
    return client, uri, client.create_experiment("crafted")


@pytest.mark.parametrize("upload", [False, True], ids=["local-folder", "artifact"])
@pytest.mark.parametrize("case_id", RUN_CASES)
def test_crafted_run_config_artifact_runs_no_code(store, case_id, upload, tmp_path, capsys):
    """A run whose checkpoint carries no config and whose config/config.yaml artifact is crafted."""
    client, uri, experiment = store
    marker, folder = tmp_path / "pwned", tmp_path / "checkpoints"
    folder.mkdir()
    ckpt = crafted_checkpoint(folder / ("best.ckpt" if upload else "best-epoch000.ckpt"))
    tags = {} if upload else {tracking.CHECKPOINT_DIR_TAG: str(folder)}
    run = client.create_run(experiment, tags=tags).info.run_id
    if upload:
        client.log_artifact(run, str(ckpt), tracking.CHECKPOINT_ARTIFACTS)
    (tmp_path / "config.yaml").write_text(as_yaml(CASES[case_id].config(marker, tmp_path)))
    client.log_artifact(run, str(tmp_path / "config.yaml"), "config")
    line = refused(capsys, ["--run-id", run, "--tracking-uri", uri, "--users", "1"], CASES[case_id].names)
    assert "The run's config artifact (config/config.yaml) names" in line
    assert not marker.exists()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())  # the artifact is readable config text
