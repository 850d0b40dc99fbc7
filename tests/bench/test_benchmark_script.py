"""scripts/benchmark.py runs end to end on tiny data and writes its numbers (no timing assertions)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from mtl_experiments.bench import build, rechub, sparse_scale
from mtl_experiments.errors import ConfigError
from tests.conftest import compose_cfg

LIGHTNING_NO_METRICS = "lightning_no_train_metrics"
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark.py"


def test_benchmark_script_writes_rates_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "1", "--repeats", "1", "--json", str(out), "data.num_samples=1000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ratio lightning/plain" in proc.stdout

    result = json.loads(out.read_text())
    contenders = {"plain", "lightning", "lightning_floor", "lightning_no_train_metrics", "lightning_no_conflict"}
    contenders |= {"plain_dataloader"}
    assert set(result["samples_per_s"]) == contenders
    assert all(rate > 0 for rate in result["samples_per_s"].values())
    assert set(result["ratios"]) == {f"{name}/plain" for name in contenders - {"plain"}} | {"lightning/lightning_floor"}
    # MTLModule's own cost beyond Lightning's floor, per step: the two rates' step times subtracted
    step_us = {k: 1e6 * result["batch_size"] / result["samples_per_s"][k] for k in ("lightning", "lightning_floor")}
    assert result["own_us_per_step"] == pytest.approx(step_us["lightning"] - step_us["lightning_floor"])
    assert "Lightning's floor: lightning_floor/plain" in proc.stdout
    assert all(ratio > 0 for ratio in result["ratios"].values())
    assert result["train_rows"] == 800 and result["overrides"] == ["data.num_samples=1000"]
    # the same spans by process CPU time: every contender, the same ratio keys, the own cost from the CPU rates
    assert set(result["cpu_samples_per_s"]) == contenders and set(result["cpu_ratios"]) == set(result["ratios"])
    assert all(len(v) == 1 and v[0] > 0 for v in result["runs_cpu_samples_per_s"].values())
    cpu_us = {k: 1e6 * result["batch_size"] / result["cpu_samples_per_s"][k] for k in ("lightning", "lightning_floor")}
    assert result["own_cpu_us_per_step"] == pytest.approx(cpu_us["lightning"] - cpu_us["lightning_floor"])
    assert "by process CPU time" in proc.stdout


def test_methods_mode_reports_step_time_relative_to_equal(tmp_path):
    out = tmp_path / "methods.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--methods",
            "--methods-list",
            "fixed",
            "--models",
            "config",
            "--tasks",
            "2,3",
            "--epochs",
            "1",
            "--repeats",
            "1",
            "--json",
            str(out),
            "data.num_samples=600",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["ratio_to_equal"]) == {"equal@T2", "fixed@T2", "equal@T3", "fixed@T3"}
    assert result["ratio_to_equal"]["equal@T2"] == 1.0
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    # the per-task-gradient floor in the same rounds; a loss-level method's floor is equal itself
    rows = result["by_model"]["config"]
    assert set(rows) == {f"{m}@T{t}" for m in ("equal", "fixed", "gradient_floor") for t in (2, 3)}
    assert rows["fixed@T2"]["floor"] == 1.0 and rows["gradient_floor@T2"]["floor"] == rows["gradient_floor@T2"]["ratio"]
    assert rows["fixed@T3"]["low"] <= rows["fixed@T3"]["ratio"] <= rows["fixed@T3"]["high"]
    assert result["families"] == {"equal": "loss", "fixed": "loss", "gradient_floor": "task_gradients"}


def test_conflict_mode_reports_the_overhead_of_the_conflict_metrics(tmp_path):
    out = tmp_path / "conflict.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--conflict", "--epochs", "1", "--repeats", "1", "--json", str(out)]
        + ["data.num_samples=1000", "module.conflict.every_n_steps=2"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "conflict metrics overhead" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["samples_per_s"]) == {"conflict_on", "conflict_off"} and result["every_n_steps"] == 2
    assert set(result["ms_per_step"]) == {"measured_every_step", "tracked_every_step", "never_measured"}
    assert result["track_every_n_steps"] == 5  # conf/module/default.yaml's cadence
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert isinstance(result["overhead"], float) and isinstance(result["estimated_overhead"], float)


# -- the census setting, torch-rechub and one model against T ---------------------------------------------
def _load_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(args: list[str], tmp_path: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTL_CACHE_DIR": str(tmp_path / "cache")}  # never the user's cache
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_census_mode_measures_plain_lightning_and_rechub_or_says_why(tmp_path, census_root):
    out = tmp_path / "census.json"
    proc = _run(
        ["--census", "--epochs", "1", "--repeats", "1", "--json", str(out), f"data.root={census_root}"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["overrides"] == ["experiment=census_mmoe", f"data.root={census_root}"]
    assert result["train_rows"] == 80 and result["batch_size"] == 1024
    assert result["config"]["backbone"]["num_experts"] == 8 and result["config"]["features"]["embedding_dim"] == 4
    assert {"plain", "lightning", "lightning_no_train_metrics"} <= set(result["samples_per_s"])
    assert not {"lightning_no_conflict", "plain_dataloader"} & set(result["samples_per_s"])
    assert "ratio lightning/plain" in proc.stdout and result["target_ratio"] == 0.95  # issue 17's census goal
    if rechub.rechub_missing() is None:
        assert set(result["samples_per_s"]) == {"plain", "lightning", "lightning_floor", LIGHTNING_NO_METRICS, "rechub"}
        assert result["skipped"] == {}
        assert result["ratios"]["lightning/rechub"] > 0 and "ratio lightning/rechub" in proc.stdout
        assert result["parameters"]["rechub"] > 0
    else:
        assert set(result["samples_per_s"]) == {"plain", "lightning", "lightning_floor", LIGHTNING_NO_METRICS}
        assert "pip install torch-rechub" in result["skipped"]["rechub"]
        assert "rechub: skipped" in proc.stdout


def test_rechub_contender_trains_its_mmoe_on_the_same_tensors_and_sizes(tmp_path, census_root):
    pytest.importorskip("torch_rechub", reason="optional benchmark contender: pip install torch-rechub")
    cfg = compose_cfg(["experiment=census_mmoe", f"data.root={census_root}", f"data.cache_dir={tmp_path / 'cache'}"])
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    trainer, loader = rechub.build_rechub(cfg, datamodule)
    ours = build.build_model(cfg, datamodule)

    model = trainer.model
    assert model.input_dims == ours.encoder.output_dim  # same columns, embedding dims and numeric inputs
    assert len(model.experts) == 8 and model.n_task == 2
    assert [m.out_features for m in model.experts[0].mlp if isinstance(m, torch.nn.Linear)] == [16]
    assert [m.out_features for m in model.towers[0].mlp if isinstance(m, torch.nn.Linear)] == [8, 1]
    group = trainer.optimizer.param_groups[0]
    assert isinstance(trainer.optimizer, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (1e-3, 1e-4)

    train = datamodule.splits["train"]
    assert loader.batch_size == 1024 and len(loader.dataset) == 80
    for i, name in enumerate(datamodule.feature_spec.categorical):
        assert torch.equal(torch.from_numpy(loader.dataset.x[name]), train["features"]["categorical"][:, i])
    for j, name in enumerate(datamodule.feature_spec.numeric):
        assert torch.equal(torch.from_numpy(loader.dataset.x[name]), train["features"]["numeric"][:, j])
    assert torch.equal(torch.from_numpy(loader.dataset.y[:, 0]), train["labels"]["income"])

    before = [p.detach().clone() for p in model.parameters()]
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        trainer.train_one_epoch(loader)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_rechub_needs_the_mmoe_backbone(tmp_path):
    pytest.importorskip("torch_rechub", reason="optional benchmark contender: pip install torch-rechub")
    cfg = compose_cfg(["data.num_samples=300", "backbone=shared_bottom"])
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    with pytest.raises(ConfigError, match="needs backbone=mmoe"):
        rechub.build_rechub(cfg, datamodule)


def test_one_vs_many_compares_one_model_with_one_per_task(tmp_path, census_root):
    out = tmp_path / "ovm.json"
    proc = _run(
        [
            "--census",
            "--one-vs-many",
            "--epochs",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
            f"data.root={census_root}",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 single-task models (sum)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["epochs"] == 2 and result["latency_rows"] == 10_000
    multi, single, total = result["multi"], result["single"], result["singles_total"]
    assert set(multi["test_auroc"]) == {"income", "marital"} and set(single) == {"income", "marital"}
    for task, r in single.items():
        assert set(r["test_auroc"]) == {task} and 0 <= r["test_auroc"][task] <= 1
        assert len(r["train_s_epochs"]) == 2 and r["train_s_per_epoch"] > 0
    assert total["parameters"] == sum(r["parameters"] for r in single.values())
    # each single-task model has its own embeddings and experts: T of them hold more than the one shared model
    assert single["income"]["parameters"] < multi["parameters"] < total["parameters"]
    assert total["test_auroc"] == {task: single[task]["test_auroc"][task] for task in single}
    assert multi["latency_ms_per_10k"] > 0 and total["latency_ms_per_10k"] > 0
    assert set(result["ratios_multi_to_singles"]) == {"parameters", "train_s_per_epoch", "latency_ms_per_10k"}


def test_one_vs_many_needs_at_least_two_tasks():
    bench = _load_script()
    args, overrides = bench.parse_args(["--one-vs-many", "--epochs", "1", "data.num_samples=300", "~data.tasks.y2"])
    with pytest.raises(ConfigError, match="T >= 2"):
        bench.one_vs_many(args, overrides)


def test_measurements_are_chosen_one_at_a_time():
    bench = _load_script()
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--methods", "--one-vs-many"])
    assert exc.value.code == 2
    args, overrides = bench.parse_args(["--census", "--one-vs-many", "seed=1"])
    assert overrides == ["experiment=census_mmoe", "seed=1"] and args.epochs == 5
    assert bench.parse_args([])[0].epochs == 3


# -- large id tables: dense Adam against sparse gradients + SparseAdam ----------------------------------------
def test_sparse_scale_reports_step_time_memory_and_ratios_per_mode(tmp_path):
    out = tmp_path / "sparse.json"
    args = ["--sparse-scale", "--sizes", "100,3000", "--steps", "2", "--repeats", "1", "--json", str(out)]
    proc = _run(args, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sparse step time 3,000 / 100 rows" in proc.stdout
    result = json.loads(out.read_text())
    assert result["sizes"] == [100, 3000] and result["batch_size"] == 512 and result["steps"] == 2
    keys = {f"{mode}@{rows}" for mode in ("dense", "sparse") for rows in (100, 3000)}
    assert set(result["ms_per_step"]) == keys and set(result["peak_mb"]) == keys
    assert all(v > 0 for v in result["ms_per_step"].values())
    # both modes train the same model: two tables of rows + 1 (the id 0) x 16, and the MLP 32 -> 64 -> 1
    expected = 2 * 3001 * 16 + (32 * 64 + 64) + (64 + 1)
    assert result["parameters"]["dense@3000"] == result["parameters"]["sparse@3000"] == expected
    for mode in ("dense", "sparse"):
        ms = result["ms_per_step"]
        assert result["ratios"][mode]["time"] == pytest.approx(ms[f"{mode}@3000"] / ms[f"{mode}@100"])
    bench = _load_script()
    with pytest.raises(SystemExit):
        bench.parse_args(["--sparse-scale", "--methods"])
    with pytest.raises(ConfigError, match="no Hydra overrides"):
        bench.sparse_scale(*bench.parse_args(["--sparse-scale", "data=recsys_synthetic"]))
    with pytest.raises(ConfigError, match="--sizes must be"):
        bench.sparse_scale(*bench.parse_args(["--sparse-scale", "--sizes", "10,x"]))


def test_sparse_scale_model_has_sparse_tables_only_in_sparse_mode():
    for sparse in (False, True):
        model, optimizer = sparse_scale.sparse_scale_model(50, sparse=sparse)
        ids = torch.randint(1, 51, (8, 2))
        torch.nn.functional.binary_cross_entropy_with_logits(model({"categorical": ids}), torch.ones(8)).backward()
        grads = [p.grad.is_sparse for p in model[0].parameters()]
        assert grads == ([True, True] if sparse else [False])  # dense: one shared table of both columns
        optimizer.step()
