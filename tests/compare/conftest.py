"""The run-comparison store, made once per test process: creating a SQLite MLflow store costs most of a module's
time, so tests read this one, or copy its file and add runs to the copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.compare.compare_store import make_store


@pytest.fixture(scope="session")
def compare_store(tmp_path_factory, empty_store) -> dict:
    """make_store's sweep (see compare_store.py); tests may add artifacts, never runs (copy it for that)."""
    return make_store(tmp_path_factory.mktemp("store"), empty_store)


def copy_store(store: dict, folder: Path) -> dict:
    """The same runs (same ids) in a copy of the store's SQLite file, to which a test may add runs."""
    source = Path(store["uri"][len("sqlite:///") :])
    target = folder / "store.db"
    shutil.copyfile(source, target)
    uri = f"sqlite:///{target}"
    return {**store, "uri": uri, "client": MlflowClient(uri), "ids": {k: list(v) for k, v in store["ids"].items()}}
