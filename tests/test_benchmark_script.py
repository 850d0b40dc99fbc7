"""scripts/benchmark.py runs end to end on tiny data and writes its numbers (no timing assertions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "benchmark.py"


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
    contenders = {"plain", "lightning", "lightning_no_train_metrics", "plain_dataloader"}
    assert set(result["samples_per_s"]) == contenders
    assert all(rate > 0 for rate in result["samples_per_s"].values())
    assert set(result["ratios"]) == {f"{name}/plain" for name in contenders - {"plain"}}
    assert all(ratio > 0 for ratio in result["ratios"].values())
    assert result["train_rows"] == 800 and result["overrides"] == ["data.num_samples=1000"]


def test_methods_mode_reports_step_time_relative_to_equal(tmp_path):
    out = tmp_path / "methods.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--methods",
            "--methods-list",
            "fixed",
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


def test_conflict_mode_reports_the_overhead_of_the_conflict_metrics(tmp_path):
    out = tmp_path / "conflict.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--conflict", "--epochs", "1", "--repeats", "1", "--json", str(out)]
        + ["data.num_samples=1000", "module.conflict.every_n_steps=2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "conflict metrics overhead" in proc.stdout
    result = json.loads(out.read_text())
    assert set(result["samples_per_s"]) == {"conflict_on", "conflict_off"} and result["every_n_steps"] == 2
    assert all(ms > 0 for ms in result["ms_per_step"].values())
    assert isinstance(result["overhead"], float) and isinstance(result["estimated_overhead"], float)
