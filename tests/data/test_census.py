"""Census-Income (KDD): parsing of the UCI files, the MMoE task groups and protocol, the cache; and the
per-feature embedding dimensions of the feature layer."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from mtl_experiments.data import census_income
from mtl_experiments.data.census_income import CATEGORICAL, COLLEGE_LEVELS, NUMERIC, CensusIncomeDataModule
from mtl_experiments.data.spec import FeatureSpec
from mtl_experiments.errors import ConfigError, DataError
from mtl_experiments.features import FeatureEncoder
from tests.conftest import free_port
from tests.fixtures_data import census_row, write_census_files

REAL = Path(__file__).resolve().parents[3] / "shared/data/census-income"
GROUP1 = {"income": {"kind": "binary"}, "marital": {"kind": "binary"}}
GROUP2 = {"education": {"kind": "binary"}, "marital": {"kind": "binary"}}

# a dozen rows: train 0..7, test 8..11 with an unseen class of worker and a "?" state in each file
TRAIN_ROWS = [census_row(i) for i in range(8)]
TEST_ROWS = [census_row(8), census_row(9, class_worker="Never worked"), census_row(10), census_row(11)]


def module(root: Path, tmp_path: Path, tasks=GROUP1, **kwargs) -> CensusIncomeDataModule:
    dm = CensusIncomeDataModule(tasks=tasks, root=str(root), cache_dir=str(tmp_path / "cache"), **kwargs)
    dm.setup()
    return dm


def column(rows, name: str) -> list[str]:
    return [r[census_income.COLUMNS.index(name)] for r in rows]


def ages(dm, split: str) -> list[int]:
    """The raw ages of a split, undoing the standardisation (ages are distinct row ids in the fixtures)."""
    mean, std = dm.numeric_stats["age"]
    return [round(v) for v in (dm.splits[split]["features"]["numeric"][:, 0] * std + mean).tolist()]


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2"])
def test_reads_plain_gzip_and_bzip2_files(suffix, tmp_path):
    root = write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS, suffix)
    dm = module(root, tmp_path)
    train = dm.splits["train"]
    assert train["features"]["categorical"].shape == (8, len(CATEGORICAL))
    assert train["features"]["numeric"].shape == (8, len(NUMERIC))
    assert train["features"]["categorical"].dtype == torch.long
    assert len(dm.splits["val"]["labels"]["income"]) + len(dm.splits["test"]["labels"]["income"]) == 4
    expected_income = [float(v == "50000+.") for v in column(TRAIN_ROWS, "income_50k")]
    assert train["labels"]["income"].tolist() == expected_income
    assert 0 < sum(expected_income) < 8  # both labels present


def test_group_1_labels_income_and_never_married(tmp_path):
    dm = module(write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS), tmp_path)
    labels = dm.splits["train"]["labels"]
    assert list(labels) == ["income", "marital"]
    assert labels["marital"].tolist() == [float(v == "Never married") for v in column(TRAIN_ROWS, "marital_stat")]
    assert labels["income"].dtype == torch.float32


def test_group_2_labels_education_at_least_college(tmp_path):
    root = write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS)
    dm = module(root, tmp_path, tasks=GROUP2, task_group=2)
    edu = column(TRAIN_ROWS, "education")
    assert dm.splits["train"]["labels"]["education"].tolist() == [float(e in COLLEGE_LEVELS) for e in edu]
    assert {"Bachelors degree(BA AB BS)", "High school graduate"} <= set(edu)
    narrow = module(root, tmp_path, tasks=GROUP2, task_group=2, college_levels=["Doctorate degree(PhD EdD)"])
    assert narrow.splits["train"]["labels"]["education"].tolist() == [float(e.startswith("Doctorate")) for e in edu]


def test_removed_columns_are_not_inputs(tmp_path):
    dm = module(write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS), tmp_path)
    inputs = set(dm.feature_spec.numeric) | set(dm.feature_spec.categorical)
    assert inputs.isdisjoint({"instance_weight", "income_50k", "education", "marital_stat"})
    assert len(inputs) == 42 - 4
    assert dm.feature_spec.numeric == (
        "age",
        "wage_per_hour",
        "capital_gains",
        "capital_losses",
        "stock_dividends",
        "num_emp",
        "weeks_worked",
    )
    assert {"det_ind_code", "own_or_self", "vet_benefits", "year"} <= set(dm.feature_spec.categorical)


def test_missing_and_unseen_values_get_id_0(tmp_path):
    dm = module(write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS), tmp_path)
    state, worker = CATEGORICAL.index("state_prev_res"), CATEGORICAL.index("class_worker")
    train = dm.splits["train"]["features"]["categorical"]
    is_missing = [v == "?" for v in column(TRAIN_ROWS, "state_prev_res")]
    assert any(is_missing)
    assert [int(i) == 0 for i in train[:, state]] == is_missing
    # vocabulary of the training file only: ids 1..K in sorted order, cardinality K + 1
    assert dm.vocabularies["state_prev_res"] == ["California", "Utah"]
    assert dm.feature_spec.categorical["state_prev_res"] == 3
    assert dm.feature_spec.categorical["class_worker"] == 4
    expected = [dm.vocabularies["class_worker"].index(v) + 1 for v in column(TRAIN_ROWS, "class_worker")]
    assert train[:, worker].tolist() == expected
    # the test file's unseen "Never worked" is id 0 wherever its row landed (age 18 + 9 = 27 identifies it)
    for split in ("val", "test"):
        cat = dm.splits[split]["features"]["categorical"]
        for row_age, ids in zip(ages(dm, split), cat.tolist(), strict=True):
            assert (ids[worker] == 0) == (row_age == 27)
            assert (ids[state] == 0) == (row_age == 18 + 10)  # row 10 has state "?"


def test_numeric_columns_are_standardised_with_training_statistics(tmp_path):
    dm = module(write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS), tmp_path)
    wage = NUMERIC.index("wage_per_hour")
    train_wages = [float(v) for v in column(TRAIN_ROWS, "wage_per_hour")]
    mean, std = statistics.fmean(train_wages), statistics.pstdev(train_wages)
    assert dm.numeric_stats["wage_per_hour"] == pytest.approx([mean, std])
    got = dm.splits["train"]["features"]["numeric"][:, wage]
    assert got.tolist() == pytest.approx([(w - mean) / std for w in train_wages], abs=1e-6)
    # validation / test rows use the *training* mean and std, not their own
    test_wage = {18 + i: float(census_row(i)[census_income.COLUMNS.index("wage_per_hour")]) for i in range(8, 12)}
    for split in ("val", "test"):
        got = dm.splits[split]["features"]["numeric"][:, wage].tolist()
        assert got == pytest.approx([(test_wage[a] - mean) / std for a in ages(dm, split)], abs=1e-6)
    # a column constant in training (capital_gains is always 0) is centred, not divided by zero
    assert dm.numeric_stats["capital_gains"] == [0.0, 1.0]


def test_test_file_is_split_one_to_one_with_the_split_seed(tmp_path):
    root = write_census_files(tmp_path / "d", TRAIN_ROWS[:4], [census_row(i) for i in range(100, 121)])
    a, b = module(root, tmp_path), module(root, tmp_path / "other", split_seed=0)
    assert (len(ages(a, "val")), len(ages(a, "test"))) == (10, 11)
    assert sorted(ages(a, "val") + ages(a, "test")) == [118 + i for i in range(21)]
    assert ages(a, "val") == ages(b, "val") and ages(a, "test") == ages(b, "test")  # the same seed: the same split
    c = module(root, tmp_path, split_seed=1)
    assert ages(c, "val") != ages(a, "val")


def test_second_setup_loads_the_cache_without_parsing(tmp_path, monkeypatch):
    root = write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS, ".gz")
    first = module(root, tmp_path)
    assert len(list((tmp_path / "cache").glob("census-income-*.pt"))) == 1

    def fail(path):
        raise AssertionError(f"parsed {path} although the cache should have been used")

    monkeypatch.setattr(census_income, "read_census", fail)
    second = module(root, tmp_path)
    for split in ("train", "val", "test"):
        for key in ("numeric", "categorical"):
            assert torch.equal(first.splits[split]["features"][key], second.splits[split]["features"][key])
        assert torch.equal(first.splits[split]["labels"]["income"], second.splits[split]["labels"]["income"])
    assert second.feature_spec == first.feature_spec
    assert second.vocabularies == first.vocabularies


def test_a_changed_config_or_file_misses_the_cache(tmp_path, monkeypatch):
    root = write_census_files(tmp_path / "d", TRAIN_ROWS, TEST_ROWS)
    calls = []
    parse = census_income.read_census
    monkeypatch.setattr(census_income, "read_census", lambda p: calls.append(p.name) or parse(p))
    module(root, tmp_path)
    module(root, tmp_path)
    assert len(calls) == 2  # parsed once (train + test), then the cache
    module(root, tmp_path, split_seed=3)
    assert len(calls) == 4
    module(root, tmp_path, tasks=GROUP2, task_group=2)
    assert len(calls) == 6
    write_census_files(root, TRAIN_ROWS[:-1], TEST_ROWS)  # the same names, other bytes
    module(root, tmp_path)
    assert len(calls) == 8
    module(root, tmp_path, cache=False)
    assert len(calls) == 10
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


def test_missing_file_names_the_path_and_the_uci_archive(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        module(tmp_path / "empty", tmp_path)
    assert str((tmp_path / "empty" / "census-income.data").resolve()) in str(e.value)
    assert "https://archive.ics.uci.edu/dataset/117/census+income+kdd" in str(e.value)


def test_malformed_files_are_data_errors(tmp_path):
    bad_label = [*TRAIN_ROWS[:-1], census_row(7, income_50k="maybe")]
    with pytest.raises(DataError, match="label"):
        module(write_census_files(tmp_path / "a", bad_label, TEST_ROWS), tmp_path)
    with pytest.raises(DataError, match="fewer than 42"):
        module(write_census_files(tmp_path / "b", [*TRAIN_ROWS, census_row(9)[:30]], TEST_ROWS), tmp_path)
    with pytest.raises(DataError, match="non-numeric"):
        module(write_census_files(tmp_path / "c", [*TRAIN_ROWS, census_row(9, age="old")], TEST_ROWS), tmp_path)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="education"):
        CensusIncomeDataModule(tasks=GROUP1, task_group=2, cache=False)
    with pytest.raises(ConfigError, match="task_group"):
        CensusIncomeDataModule(tasks=GROUP1, task_group=3, cache=False)
    with pytest.raises(ConfigError, match="Bachelor"):
        CensusIncomeDataModule(tasks=GROUP2, task_group=2, college_levels=["Bachelors"], cache=False)
    with pytest.raises(ConfigError, match="binary"):
        CensusIncomeDataModule(tasks={**GROUP1, "income": {"kind": "regression"}}, cache=False)


@pytest.mark.skipif(not REAL.is_dir(), reason=f"the real Census-Income files are not at {REAL}")
def test_real_files_follow_the_mmoe_protocol(tmp_path, train_run, monkeypatch):
    dm = module(REAL, tmp_path)
    s = dm.splits
    assert len(s["train"]["labels"]["income"]) == 199_523
    assert len(s["val"]["labels"]["income"]) + len(s["test"]["labels"]["income"]) == 99_762
    assert len(s["val"]["labels"]["income"]) == 49_881
    assert float(s["train"]["labels"]["income"].mean()) == pytest.approx(12_382 / 199_523)  # 6.21 %
    for split in ("val", "test"):
        assert float(s[split]["labels"]["income"].mean()) == pytest.approx(0.062, abs=0.002)
    assert float(s["train"]["labels"]["marital"].mean()) == pytest.approx(0.433, abs=0.002)
    assert dm.feature_spec.categorical["state_prev_res"] == 51  # 50 values + the missing/unseen id

    # the second load comes from the cache (~0.1 s against ~8 s; timed by benchmark.py --startup, not here): the
    # raw files are not parsed again, and the tensors are the first load's
    def parsed_again(path):
        raise AssertionError(f"the second load parsed {path}: the cache was not used")

    with monkeypatch.context() as patch:
        patch.setattr(census_income, "read_census", parsed_again)
        again = module(REAL, tmp_path).splits
    for split in ("train", "val", "test"):
        assert torch.equal(again[split]["labels"]["income"], s[split]["labels"]["income"])
    # one epoch of training on the real data, from the cache
    run = train_run(
        "data=census_income", f"data.root={REAL}", f"data.cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1"
    )
    assert run.data.metrics["test/income/auroc"] > 0.85 and run.data.metrics["test/marital/auroc"] > 0.9


def test_feature_encoder_equal_dims_share_one_table():
    spec = FeatureSpec(numeric=("x",), categorical={"a": 3, "b": 5})
    enc = FeatureEncoder(spec, embedding_dim=4)
    assert enc.shared_table and enc.embedding.weight.shape == (8, 4)
    assert enc.output_dim == 2 * 4 + 1
    out = enc({"categorical": torch.tensor([[0, 4], [2, 0]]), "numeric": torch.ones(2, 1)})
    assert out.shape == (2, 9)
    # id 0 of each column is its own learned row (missing / unseen), not shared between columns
    assert torch.equal(out[0, :4], enc.embedding.weight[0]) and torch.equal(out[1, 4:8], enc.embedding.weight[3])


def test_feature_encoder_per_column_dims():
    spec = FeatureSpec(numeric=("x", "y"), categorical={"a": 3, "b": 5, "c": 2}, embedding_dims={"c": 6})
    enc = FeatureEncoder(spec, embedding_dim=4, embedding_dims={"b": 2})
    assert enc.embedding_dims == {"a": 4, "b": 2, "c": 6}  # config > dataset suggestion > global
    assert not enc.shared_table and [e.weight.shape for e in enc.embeddings] == [(3, 4), (5, 2), (2, 6)]
    out = enc({"categorical": torch.tensor([[2, 4, 1]]), "numeric": torch.tensor([[7.0, 8.0]])})
    assert out.shape == (1, enc.output_dim) == (1, 4 + 2 + 6 + 2)
    assert torch.equal(out[0, 4:6], enc.embeddings[1].weight[4]) and out[0, -2:].tolist() == [7.0, 8.0]
    with pytest.raises(ConfigError, match="not categorical"):
        FeatureEncoder(spec, embedding_dims={"x": 3})
    with pytest.raises(ConfigError, match="features.embedding_dims.a must be an integer >= 1, got 0"):
        FeatureEncoder(spec, embedding_dims={"a": 0})
    with pytest.raises(DataError):
        FeatureSpec(categorical={"a": 3}, embedding_dims={"z": 2})
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_per_column_dims_from_the_command_line(census_root, train_run, tmp_path):
    run = train_run(
        "data=census_income",
        f"data.root={census_root}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=16",
        "features.embedding_dim=3",
        "features.embedding_dims={state_prev_res: 5}",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
    )
    assert run.data.params["features.embedding_dims.state_prev_res"] == "5"


# ---- download: true (a real HTTP server on 127.0.0.1 stands in for the UCI archive) ----------------------


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base url, request log)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    folder = tmp_path / "served"
    folder.mkdir()
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def log_message(self, fmt, *args):
            requests.append(self.path)

    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{port}/census-income-mld", requests
    server.shutdown()
    server.server_close()


def _serve_fixture(folder: Path) -> dict[str, str]:
    """The fixture files as UCI serves them (.gz) and the sha256 of their uncompressed content."""
    import gzip
    import hashlib

    src = write_census_files(folder / "census-income-mld", TRAIN_ROWS, TEST_ROWS, ".gz")

    return {n: hashlib.sha256(gzip.open(src / f"{n}.gz").read()).hexdigest() for n in census_income.FILES.values()}


def test_download_fetches_verifies_and_loads(http_folder, tmp_path):
    folder, url, requests = http_folder
    sha = _serve_fixture(folder)
    root = tmp_path / "fresh"
    dm = module(root, tmp_path, download=True, download_url=url, download_sha256=sha)
    assert sorted(p.name for p in root.iterdir()) == ["census-income.data.gz", "census-income.test.gz"]
    assert len(dm.splits["train"]["labels"]["income"]) == len(TRAIN_ROWS)
    n = len(requests)
    module(root, tmp_path, download=True, download_url=url, download_sha256=sha)
    assert len(requests) == n  # files present: nothing fetched again


def test_download_with_a_wrong_checksum_keeps_nothing(http_folder, tmp_path):
    folder, url, _ = http_folder
    sha = _serve_fixture(folder)
    root = tmp_path / "fresh"
    bad = {**sha, "census-income.data": "0" * 64}
    with pytest.raises(DataError, match="sha256.*nothing was kept"):
        module(root, tmp_path, download=True, download_url=url, download_sha256=bad)
    assert not any(p.name.startswith("census-income.data") or ".part" in p.name for p in root.iterdir())


def test_download_from_an_unreachable_archive_names_the_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/census-income-mld"  # nothing listens there
    with pytest.raises(DataError, match=f"Cannot download {url}/census-income.data.gz"):
        module(tmp_path / "fresh", tmp_path, download=True, download_url=url)
    assert not list((tmp_path / "fresh").iterdir())


def _uci_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("archive.ics.uci.edu", 443), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _uci_reachable(), reason="the UCI archive (archive.ics.uci.edu) is not reachable from here")
def test_download_from_the_uci_archive_matches_the_published_checksums(tmp_path):
    dm = module(tmp_path / "uci", tmp_path, download=True)
    assert len(dm.splits["train"]["labels"]["income"]) == 199_523
