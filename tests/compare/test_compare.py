"""Run comparison (mtl_experiments/compare/, scripts/compare_runs.py): grouping and mean ± std on runs written
straight into a real (temporary) MLflow store, the CLI end to end, and a run trained against a real
`mlflow server` read back over HTTP."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from mtl_experiments import compare
from mtl_experiments.pipeline import train
from tests.compare.compare_store import EXPERIMENT, TEST_KEYS, log_run, make_store
from tests.conftest import ROOT, fresh_store


@pytest.fixture(scope="module")
def store(compare_store):
    """Shared by the tests that only read it (tests/compare/conftest.py makes it once)."""
    return compare_store


def row_of(c: compare.Comparison, run_id: str) -> pd.Series:
    (index,) = [i for i, g in enumerate(c.groups) if run_id in {r.run_id for r in g.runs}]
    return c.table.iloc[index]


# ------------------------------------------------------------------------------------ grouping, table


def test_groups_mean_std_and_delta_m_against_the_single_task_runs_of_the_same_data(store):
    selection = compare.load_runs(store["uri"], experiment=EXPERIMENT)
    ids = store["ids"]
    assert selection.skipped == {
        "status FAILED": ids["failed"],
        "sweep parent run (holds no results)": [store["parent"]],
    }
    c = compare.compare(selection)
    assert len(c.groups) == 5  # per-run paths, seed and loss.seed do not split groups
    assert c.metric_keys == list(TEST_KEYS)
    assert compare.default_pareto_metrics(c) == ("y1/auroc", "y2/auroc")
    assert c.choice_columns == ["data", "backbone", "loss"]
    assert c.param_columns == ["data.correlation"]  # backbone.*/loss.* differences are explained by the choices

    mtl = row_of(c, ids["mtl_equal"][0])
    assert mtl["n"] == 2 and mtl["seeds"] == "0,1"
    assert mtl["test/y1/auroc_mean"] == pytest.approx(0.85)
    assert mtl["test/y1/auroc_std"] == pytest.approx(math.sqrt(2 * 0.01**2))  # ddof=1
    assert mtl["test/y1/logloss_std"] == pytest.approx(0.0)
    assert mtl["test/y2/logloss_mean"] == pytest.approx(0.63)
    # baseline = mean of the two single_task/equal runs: 0.80, 0.50, 0.70, 0.60
    # seed 0: (+5 + 10 + 0 + 0) / 4 = 3.75;  seed 1: (+7.5 + 10 + 0 - 10) / 4 = 1.875
    assert mtl["delta_m_pct_mean"] == pytest.approx((3.75 + 1.875) / 2)
    assert mtl["delta_m_pct_std"] == pytest.approx((3.75 - 1.875) / math.sqrt(2))
    stl_label = row_of(c, ids["stl_equal"][0])["group"]
    assert mtl["delta_m_baseline"] == f"vs {stl_label} (n=2)"
    assert mtl["conflict/mean/cosine/y1-y2_mean"] == pytest.approx(0.3)
    assert mtl["conflict/mean/rate/y1-y2_mean"] == pytest.approx(0.2)
    assert mtl["conflict/mean/initial_cosine/y1-y2_mean"] == pytest.approx(0.8)

    rlw = row_of(c, ids["mtl_rlw"][0])
    # (0 + 0 + 10 + 10) / 4 = +5 for both seeds
    assert rlw["delta_m_pct_mean"] == pytest.approx(5.0) and rlw["delta_m_pct_std"] == pytest.approx(0.0)
    assert row_of(c, ids["stl_equal"][0])["delta_m_pct_mean"] == pytest.approx(0.0)
    assert row_of(c, ids["stl_equal"][0])["delta_m_baseline"] == "baseline itself"
    assert row_of(c, ids["stl_rlw"][0])["delta_m_baseline"] == f"vs {stl_label} (n=2)"
    # the run of other data is its own baseline, never the baseline of the 0.5-correlation groups
    other = row_of(c, ids["other_data"][0])
    assert other["data.correlation"] == "0.9" and other["delta_m_baseline"] == "baseline itself"

    md = compare.to_markdown(c)
    assert "**Positive Δm% = better than single-task**" in md
    assert "| 0.8500 ± 0.0141 |" in md and "| +2.81 ± 1.33 |" in md
    assert "skipped 2: 1 status FAILED" in md
    assert "| 0.300 ± 0.141 |" in md  # mean conflict cosine of the equal group

    # Δm over a metric subset: auroc only -> seed 0: (5 + 0) / 2, seed 1: (7.5 + 0) / 2
    sub = row_of(compare.compare(selection, metrics=["auroc"]), ids["mtl_equal"][0])
    assert sub["delta_m_pct_mean"] == pytest.approx(3.125) and sub["delta_m_metrics"] == "y1/auroc,y2/auroc"


def test_no_single_task_baseline_is_reported_not_invented(tmp_path, empty_store):
    s = make_store(tmp_path, empty_store, with_single_task=False)
    c = compare.compare(compare.load_runs(s["uri"], parent=s["parent"]))
    assert set(c.table["delta_m_baseline"]) == {compare.NO_BASELINE}
    assert c.table["delta_m_pct_mean"].isna().all()
    md = compare.to_markdown(c)
    assert md.count("| n/a: no single_task runs of this data |") == 2


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_writes_markdown_csv_and_pareto_plot(store, tmp_path):
    out = tmp_path / "report"
    cmd = [sys.executable, str(ROOT / "scripts" / "compare_runs.py"), "--tracking-uri", store["uri"]]
    proc = subprocess.run(
        [*cmd, "--experiment", EXPERIMENT, "--out", str(out)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "| synthetic | shared_bottom | equal | 0.5 | 2 | 0,1 |" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| data"))
    assert header.index("cos₀ y1-y2") < header.index("cos y1-y2") < header.index("conflict y1-y2")
    assert {p.name for p in out.iterdir()} == set(compare.OUTPUT_FILES)
    assert (out / "comparison.md").read_text().strip() == proc.stdout.strip()
    assert len(pd.read_csv(out / "comparison.csv")) == 5
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_latest_sweep_logs_the_files_to_the_parent(store, tmp_path, capsys):
    rc = compare.main(
        ["--tracking-uri", store["uri"], "--latest-sweep", "--pareto", "y1/logloss,y2/auroc", "--log-to-parent"]
    )
    assert rc == 0
    arts = {a.path for a in store["client"].list_artifacts(store["parent"], "comparison")}
    assert arts == {f"comparison/{f}" for f in compare.OUTPUT_FILES}
    assert f"parent run `{store['parent']}`" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--experiment", "nope"], "No experiment 'nope'"),
        (["--tag", "loss=famo"], "No FINISHED runs"),
        (["--pareto", "y1/auroc,y3/auroc"], "--pareto takes two of"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(store, capsys, args, message):
    assert compare.main(["--tracking-uri", store["uri"], *args]) == 2
    assert message in capsys.readouterr().err


def test_missing_store_is_not_created(tmp_path, capsys):
    assert compare.main(["--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "No MLflow store at" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


# -------------------------------------------------------------------------------- real tracking server


def test_train_against_a_real_server_and_compare_over_http(mlflow_server, make_cfg, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    train(make_cfg("logger.mlflow.tracking_uri=null", "trainer.max_epochs=1"))
    capsys.readouterr()
    assert compare.main(["--experiment", "mtl-experiments", "--out", str(tmp_path / "cmp")]) == 0  # URI from env
    out = capsys.readouterr().out
    assert f"store `{mlflow_server}`" in out
    assert "1 FINISHED run(s) in 1 group(s)" in out
    assert "| synthetic | shared_bottom | equal | 1 | 0 |" in out
    assert "| y1/auroc ↑ | y1/accuracy ↑ | y1/logloss ↓ | y2/auroc ↑ |" in out  # model-selection metric first
    assert compare.NO_BASELINE in out
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert 0.5 < table.loc[0, "test/y1/auroc_mean"] <= 1.0


def test_run_names_and_user_tags_do_not_split_a_group():
    from mtl_experiments.compare import group_key

    base = {"data.correlation": "0.5", "loss._target_": "x", "seed": "0", "logger.mlflow.tags": "{}"}
    tagged = {**base, "seed": "1", "run_name": "mine", "logger.mlflow.tags.owner": "ana", "logger.mlflow.tags": "x"}
    assert group_key(base) == group_key(tagged)
    assert group_key(base) != group_key({**base, "data.correlation": "0.9"})


def test_segment_metrics_are_not_taken_for_tasks():
    """A run with warm / cold segments logs test/warm/mean_auroc and test/cold_user/<task>/<metric>: neither is a
    task's whole-split metric (a task named 'warm' would appear otherwise)."""
    run = compare.RunData(
        run_id="r", run_name="", status="FINISHED", experiment_id="0", start_time=0, params={}, tags={},
        metrics={"test/click/auroc": 0.7, "test/mean_auroc": 0.7, "test/warm/mean_auroc": 0.71,
                 "test/warm/click/auroc": 0.71, "test/cold_user/click/auroc": 0.66},
    )  # fmt: skip
    assert run.test_metrics() == {"click/auroc": 0.7}


def test_segment_option_compares_a_segments_test_metrics(tmp_path, capsys, empty_store):
    """--segment cold_user: the groups' values and Δm come from test/cold_user/<task>/<metric>; a run without
    that segment is skipped, saying why."""
    client = MlflowClient(fresh_store(empty_store, tmp_path / "seg.db"))
    exp = client.create_experiment(EXPERIMENT)
    cold = lambda a, b: {"test/cold_user/y1/auroc": a, "test/cold_user/y2/auroc": b}  # noqa: E731
    for seed, (a, b) in enumerate([(0.60, 0.70), (0.62, 0.72)]):
        log_run(client, exp, "shared_bottom", "equal", seed, (0.9, 0.3, 0.9, 0.3), extra_metrics=cold(a, b))
    for seed in (0, 1):
        log_run(client, exp, "single_task", "equal", seed, (0.8, 0.4, 0.8, 0.4), extra_metrics=cold(0.5, 0.5))
    no_segment = log_run(client, exp, "mmoe", "equal", 0, (0.9, 0.3, 0.9, 0.3))
    uri = f"sqlite:///{tmp_path / 'seg.db'}"
    selection = compare.load_runs(uri, experiment=EXPERIMENT, segment="cold_user")
    assert selection.skipped == {"no test/cold_user/<task>/<metric> metrics": [no_segment]}
    c = compare.compare(selection)
    assert c.metric_keys == ["y1/auroc", "y2/auroc"]
    mtl = c.table[c.table["group"].str.contains("shared_bottom")].iloc[0]
    assert mtl["test/y1/auroc_mean"] == pytest.approx(0.61)
    # Δm against the single-task runs' cold_user values (0.5): ((0.61 - 0.5) + (0.71 - 0.5)) / 0.5 / 2 = 32 %
    assert mtl["delta_m_pct_mean"] == pytest.approx(32.0)
    assert compare.main(["--tracking-uri", uri, "--segment", "cold_user"]) == 0
    assert "`cold_user` segment" in capsys.readouterr().out


def test_the_first_conflict_column_is_the_headline_estimator():
    """mtl-compare names the headline without importing torch; it must stay the one metrics.conflict reports."""
    from mtl_experiments.compare.comparison import CONFLICT_COLUMNS
    from mtl_experiments.metrics.conflict import HEADLINE

    assert CONFLICT_COLUMNS[0][0] == HEADLINE
