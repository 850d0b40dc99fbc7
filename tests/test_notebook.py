"""notebooks/compare_runs.ipynb: executes headless against a tiny sweep, and is committed without outputs."""

from __future__ import annotations

import json
import sys

import pytest

from tests.compare.compare_store import EXPERIMENT, make_store
from tests.conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "compare_runs.ipynb"
KERNEL = "mtl-experiments-test"


def test_notebook_runs_against_a_tiny_sweep(tmp_path, monkeypatch, empty_store):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # a kernel of this very interpreter (a user's own "python3" kernelspec may point at another Python)
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    store = make_store(tmp_path, empty_store)  # includes weight and conflict-cosine histories
    # the kernel inherits this environment; the notebook's first cell reads it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    monkeypatch.setenv("MTL_EXPERIMENT", EXPERIMENT)
    monkeypatch.setenv("MTL_PARENT", "latest")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    # runs clean: no warning on stderr (tqdm's "IProgress not found" TqdmWarning, raised by MLflow's import of
    # tqdm.auto in a kernel without ipywidgets, which the dev extra now installs)
    assert not [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    text = "\n".join(str(o.get("data", {}).get("text/markdown", "")) + o.get("text", "") for o in outputs)
    assert "| +2.81 ± 1.33 |" in text  # the table of test_compare's store, read through the latest sweep
    assert "No train/" not in text  # both histories were found and plotted
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # weights, conflict cosine, Pareto front


def test_committed_notebook_has_no_outputs():
    nb = json.loads(NOTEBOOK.read_text())  # plain JSON: runs without the notebook extras
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code
    for cell in code:
        assert cell["outputs"] == [] and cell["execution_count"] is None, "".join(cell["source"])[:60]
    assert "widgets" not in nb["metadata"]
