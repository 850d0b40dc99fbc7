"""The MLflow UI, in a real headless browser (Playwright + Chromium), on a run this project recorded in a real
`mlflow server`: the experiment link opens on the runs table (not MLflow 3's GenAI overview), the run's name leads
with what distinguishes it, its page shows the dataset, and its "Model metrics" tab opens on a curve, with the
one-point best score (``val_best/...``) after the train/val curves (MLflow orders chart sections by name).

Skipped, saying why, where Playwright or a Chromium is missing: ``pip install -e '.[ui]'``, then ``playwright
install chromium`` or a system Chromium (Debian: ``apt-get install chromium``). ``MTL_UI_SCREENSHOTS=<folder>``
keeps a screenshot of each page (docs/figures/mlflow_ui_*.png were taken so).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mtl_experiments import tracking
from mtl_experiments.pipeline import train

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install -e '.[ui]'")


def launch(p):
    """Playwright's own Chromium if installed, else the system's; None when there is neither."""
    try:
        return p.chromium.launch()
    except Exception:  # noqa: BLE001 - its browser was not downloaded (`playwright install chromium`)
        system = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        return p.chromium.launch(executable_path=system) if system else None


def show(page, url: str, expect: str, shot: str) -> str:
    """Open ``url``, wait until ``expect`` is on the page, keep a screenshot if asked; the page's text."""
    page.goto(url)
    page.get_by_text(expect).first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)  # charts and lazy columns settle
    folder = os.environ.get("MTL_UI_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / f"mlflow_ui_{shot}.png"))
    return page.inner_text("body")


def chart_sections(text: str) -> list[str]:
    """The chart sections of the "Model metrics" tab in page order: each title is followed by its count, ``(N)``."""
    lines = [line.strip() for line in text.splitlines()]
    return [title for title, count in zip(lines, lines[1:], strict=False) if re.fullmatch(r"\(\d+\)", count)]


def test_the_experiment_link_opens_on_the_runs(mlflow_server, make_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # 2 epochs, every step measured (as a default-size run measures some steps in every epoch): curves of 2 points
    train(make_cfg("logger.mlflow.tracking_uri=null", "trainer.max_epochs=2", "module.conflict.every_n_steps=1"))
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("mtl-experiments")
    (run,) = client.search_runs([exp.experiment_id])
    base = tracking.ui_base(mlflow_server)
    with playwright.sync_playwright() as p:
        browser = launch(p)
        if browser is None:
            pytest.skip("no Chromium: `playwright install chromium` or `apt-get install chromium`")
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            text = show(page, tracking.experiment_url(base, exp.experiment_id), run.info.run_name, "runs")
            assert "/runs" in page.url and "workflowType=machine_learning" in page.url, page.url
            assert "Detect issues" not in text  # the GenAI overview's call to action
            text = show(page, tracking.run_url(base, exp.experiment_id, run.info.run_id), "synthetic", "run")
            assert run.info.run_name in text and run.info.run_id in text
            page.get_by_text("Model metrics").first.click()
            text = show(page, page.url, "Add chart", "metrics")
            sections = chart_sections(text)
            charts = [k for k in run.data.metrics if k.rpartition("/")[0] == sections[0]]
            points = {k: len(client.get_metric_history(run.info.run_id, k)) for k in charts}
            assert points and max(points.values()) > 1, (sections, points)  # a curve first, not a one-point summary
            curves = [i for i, name in enumerate(sections) if name.split("/")[0] in ("train", "val")]
            assert sections.index("val_best") > max(curves), sections  # the best score after the train/val curves
        finally:
            browser.close()
