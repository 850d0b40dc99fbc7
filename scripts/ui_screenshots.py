"""Screenshots of the MLflow UI on a small sweep, as a new user sees it (docs/figures/mlflow_ui_*.png).

    python scripts/ui_screenshots.py --out docs/figures

Runs ``train.py -m loss=equal,uncertainty seed=0,1`` on tiny synthetic data into a temporary SQLite store, serves
it with ``mlflow server``, and photographs, in headless Chromium (``pip install -e '.[ui]'`` and a Chromium), the
links the project prints: the experiment's runs (the sweep's row expanded), a child run's page and its metric
charts. Extra overrides after ``--`` go to every job (e.g. ``-- module.conflict.every_n_steps=5``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.num_samples=2000", "data.input_dim=8", "trainer.max_epochs=4", "~callbacks.progress_bar"]


def sweep(folder: Path, extra: list[str]) -> None:
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "loss=equal,uncertainty", "seed=0,1", *SMALL, *extra]
    cmd.append(f"hydra.sweep.dir={folder / 'multirun' / '14-03-12-a1b2c3'}")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    subprocess.run(cmd, cwd=folder, env=env, check=True)


def serve(folder: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def photograph(base: str, out: Path) -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    from mtl_experiments import tracking

    client = MlflowClient(base)
    exp = client.get_experiment_by_name("mtl-experiments")
    child = next(r for r in client.search_runs([exp.experiment_id]) if "mlflow.parentRunId" in r.data.tags)
    with sync_playwright() as p:
        system = shutil.which("chromium") or shutil.which("chromium-browser")
        browser = p.chromium.launch(executable_path=system) if system else p.chromium.launch()
        page = browser.new_page(viewport={"width": 1500, "height": 800})
        page.goto(tracking.experiment_url(base, exp.experiment_id))
        page.get_by_text("synthetic: loss x seed").first.wait_for(timeout=60_000)
        with contextlib.suppress(Exception):  # MLflow's assistant panel, when it opens, covers a third of the page
            page.get_by_role("button", name="Close").last.click(timeout=3000)
        page.locator("button[data-component-id*='runnamecellrenderer']").first.click(timeout=10_000)  # expand
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "mlflow_ui_runs.png"))
        run_page = tracking.run_url(base, exp.experiment_id, child.info.run_id)
        page.goto(run_page)
        page.get_by_text(child.info.run_name).first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "mlflow_ui_run.png"), full_page=True)
        page.goto(run_page.replace("?", "/model-metrics?"))
        page.wait_for_timeout(6000)
        page.screenshot(path=str(out / "mlflow_ui_metrics.png"))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    parser.add_argument("--port", type=int, default=5077)
    args, extra = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        sweep(Path(tmp), [e for e in extra if e != "--"])
        server = serve(Path(tmp), args.port)
        try:
            photograph(f"http://127.0.0.1:{args.port}", args.out.resolve())
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its workers
            server.wait(timeout=30)
    print(f"Screenshots in {args.out}")


if __name__ == "__main__":
    main()
