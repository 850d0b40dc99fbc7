"""Start-up (``--startup``, issue 17 part 4): how long a fresh ``python train.py`` takes to refuse a bad config or print
``--help``, and how long a fresh process spends loading census from its cache.

Every sample is its own new interpreter (``subprocess``), launched from a new empty folder; after one untimed
warm-up of each, the samples run interleaved for ``--repeats`` rounds and each is reported as its median and
min-max of wall seconds (process start to exit, as a user waits for it):

- ``interpreter``: ``python -c pass`` and ``import_torch``: ``python -c "import torch"``, references measured in
  the same rounds, so the figures read as ratios on a noisy machine;
- ``config_value_error``: ``python train.py optimizer.lr=-1``, which must exit 2 with exactly one ``Error:`` line
  on stderr;
- ``config_group_error``: ``python train.py loss=nonexistent`` (Hydra's list of the options follows the
  ``Error:`` line), exit 2;
- ``help``: ``python train.py --help``, exit 0;
- ``census_cache_hit``: ``python -m mtl_experiments.bench.startup census``, a process that composes
  ``experiment=census_mmoe`` (``compose_s``), imports its datamodule's module (``import_s``: torch, pandas,
  Lightning) and loads the data (``load_s``: the datamodule built, ``prepare_data`` and ``setup``: the raw files'
  sha256, the cached tensors read); its warm-up fills the cache (``data.cache_dir``) where it was empty. Skipped,
  with the reason printed, where the census files (``data.root``) are absent.

A sample that exits with another code, prints a traceback or more than its one line, leaves any file in its folder
(Hydra's run folder or an MLflow store: a refused config records nothing), or (census) loads without a
cache hit is an error: it is not timed, the table says FAILED, and the benchmark ends with exit code 2 naming each
failure (no ``--json`` then). Goals (issue 17): a config error <= 2 s; census second start (cache hit) <= 1 s of
data time (``load_s``).

``--json`` keys: ``repeats``; ``load_average`` (1-minute, before and after); ``samples``: ``{name: {"command",
"exit_code" (expected), "seconds" (each round), "median_s", "min_s", "max_s", "per_interpreter",
"per_import_torch"}}``, the census sample also ``"phases": {"compose_s" | "import_s" | "load_s": {"median_s",
"min_s", "max_s"}}`` and ``"warmup"`` (its untimed first process: ``cache_hit`` and its phases); ``census_skipped``
(the reason, or null); ``goals``: ``[{"what", "limit_s", "median_s", "met"}]``; ``errors`` (empty).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mtl_experiments.errors import ConfigError, DataError, MTLError

# bench.timing and bench.build import Lightning: only the functions the parent runs import them, so the census
# child's import_s counts what loading the dataset itself imports

MODULE = "mtl_experiments.bench.startup"
CENSUS_OVERRIDES = ("experiment=census_mmoe",)
# a refused start leaves nothing: a value error is refused before Hydra makes the run's folder
# (outputs.OutputsCallback.on_run_start), so any file a sample leaves, Hydra's or an MLflow store, is a failure
TIMEOUT_S = 300  # a sample that hangs is an error, not a figure
GOALS = (("config_value_error", None, 2.0), ("config_group_error", None, 2.0), ("census_cache_hit", "load_s", 1.0))


@dataclass(frozen=True)
class Sample:
    """``python <args>`` in an empty folder; it must exit with ``exit_code``, without a traceback; an error sample
    (exit code 2) must start its stderr with ``Error:``, and with ``one_line`` print nothing else there."""

    name: str
    args: tuple[str, ...]
    exit_code: int = 0
    one_line: bool = False

    @property
    def command(self) -> str:
        return " ".join(["python", *(f'"{a}"' if " " in a else a for a in self.args)])


CENSUS = Sample("census_cache_hit", ("-m", MODULE, "census"))


def cli_samples(train_py: Path) -> tuple[Sample, ...]:
    """The references and the three ``train.py`` samples (``train_py``: the script, run by its path)."""
    train = str(train_py)
    return (
        Sample("interpreter", ("-c", "pass")),
        Sample("import_torch", ("-c", "import torch")),
        Sample("config_value_error", (train, "optimizer.lr=-1"), exit_code=2, one_line=True),
        Sample("config_group_error", (train, "loss=nonexistent"), exit_code=2),
        Sample("help", (train, "--help")),
    )


def problem(sample: Sample, returncode: int, stderr: str, left: list[str]) -> str | None:
    """What is wrong with one finished sample, or None."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    if returncode != sample.exit_code:
        return f"exited {returncode}, expected {sample.exit_code}: {lines[-1] if lines else '(no stderr)'}"
    if "Traceback" in stderr:
        return f"printed a traceback: {lines[-1]}"
    if sample.exit_code == 2 and not (lines and lines[0].startswith("Error:")):
        return f"stderr does not start with 'Error:': {lines[0] if lines else '(empty)'}"
    if sample.one_line and len(lines) != 1:
        return f"printed {len(lines)} lines on stderr, expected its one 'Error:' line"
    if left:
        return f"left {', '.join(sorted(left)[:3])} in its working folder (a refused config records nothing)"
    return None


def run_sample(sample: Sample) -> float | str:
    """Wall seconds of one fresh ``python <args>`` in a new empty folder, or what went wrong (a string)."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}  # the user's own error mode, as-is
    with tempfile.TemporaryDirectory(prefix="mtl-startup-") as folder:
        # a config error must record nothing: its default MLflow store would land in this folder
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, *sample.args], cwd=folder, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return f"did not finish in {TIMEOUT_S} s"
        seconds = time.perf_counter() - start
        left = os.listdir(folder)
        wrong = problem(sample, proc.returncode, proc.stderr, left)
    return seconds if wrong is None else wrong


# -- the census child: one fresh process, its phases timed -------------------------------------------------
def cached_files(cache_dir: Path | None) -> set[str]:
    return {p.name for p in cache_dir.glob("*.pt")} if cache_dir is not None and cache_dir.is_dir() else set()


def measure_census() -> dict:
    """In this fresh process: seconds to compose the config, import the datamodule's module, build and set it up;
    ``cache_hit``: the load wrote no new cache file (``cache: false`` counts as no hit)."""
    start = time.perf_counter()
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import get_class, instantiate

    from mtl_experiments.cli import CONFIG_DIR

    GlobalHydra.instance().clear()  # callable from a process that composed before (the tests)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(CENSUS_OVERRIDES))
    composed = time.perf_counter()
    get_class(cfg.data._target_)  # torch, pandas, Lightning and the dataset's module
    imported = time.perf_counter()
    datamodule = instantiate(cfg.data, _convert_="all")
    before = cached_files(datamodule.cache_dir)
    datamodule.prepare_data()
    datamodule.setup()
    loaded = time.perf_counter()
    hit = datamodule.cache and datamodule.cache_dir is not None and cached_files(datamodule.cache_dir) == before
    return {
        "compose_s": composed - start,
        "import_s": imported - composed,
        "load_s": loaded - imported,
        "cache_hit": bool(hit),
        "rows": {name: int(len(next(iter(split["labels"].values())))) for name, split in datamodule.splits.items()},
    }


def census_absent() -> str | None:
    """Why the census sample cannot run here (its files absent: the DataError's own message), or None."""
    from mtl_experiments.bench.build import compose_config
    from mtl_experiments.pipeline import build

    try:
        build(compose_config(list(CENSUS_OVERRIDES)), "data").files()
    except DataError as e:
        return str(e)
    return None


def run_census(warmup: bool = False) -> dict | str:
    """One census child process: its phases and its own wall seconds, or what went wrong (a string)."""
    from mtl_experiments.bench.timing import fresh_process

    start = time.perf_counter()
    try:
        out = fresh_process(MODULE, ["census"], "the census cache-hit sample")
    except (RuntimeError, ValueError, IndexError) as e:  # a crash, or no JSON line
        return (str(e).strip().splitlines() or ["(no output)"])[-1]
    out["process_s"] = time.perf_counter() - start
    if not warmup and not out["cache_hit"]:
        return "loaded without a cache hit (data.cache off, or the cache entry was written again)"
    return out


# -- summary, table -------------------------------------------------------------------------------------------
def stats(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def summarise(sample: Sample, results: list, errors: list[str]) -> dict:
    """A sample's figures over its rounds; a round that went wrong goes to ``errors`` and not into the figures."""
    errors += [f"{sample.name} ({sample.command}): {r}" for r in results if isinstance(r, str)]
    good = [r for r in results if not isinstance(r, str)]
    out = {"command": sample.command, "exit_code": sample.exit_code}
    if not good:
        return {**out, "seconds": [], "median_s": None, "min_s": None, "max_s": None}
    walls = [r["process_s"] if isinstance(r, dict) else r for r in good]
    out |= {"seconds": walls, **stats(walls)}
    if isinstance(good[0], dict):
        out["phases"] = {k: stats([r[k] for r in good]) for k in ("compose_s", "import_s", "load_s")}
    return out


def ratios(samples: dict) -> None:
    """Each sample's median over the references' medians (``per_interpreter``, ``per_import_torch``)."""
    for key, reference in (("per_interpreter", "interpreter"), ("per_import_torch", "import_torch")):
        base = samples.get(reference, {}).get("median_s")
        for s in samples.values():
            s[key] = s["median_s"] / base if s["median_s"] is not None and base else None


def goals(samples: dict) -> list[dict]:
    out = []
    for name, phase, limit in GOALS:
        if name not in samples or samples[name]["median_s"] is None:
            continue
        median = samples[name]["phases"][phase]["median_s"] if phase else samples[name]["median_s"]
        what = f"{name} {phase}" if phase else name
        out.append({"what": what, "limit_s": limit, "median_s": median, "met": median <= limit})
    return out


def span(figures: dict) -> str:
    if figures["median_s"] is None:
        return "FAILED"
    return f"{figures['median_s']:.2f} ({figures['min_s']:.2f}-{figures['max_s']:.2f})"


def report(result: dict) -> None:
    table = Table(title=f"Start-up: fresh processes, median (min-max) of {result['repeats']} interleaved round(s)")
    for column in ("sample", "command", "exit", "wall s", "/ python -c pass", "/ import torch"):
        table.add_column(column, justify="left" if column in ("sample", "command") else "right")
    for name, s in result["samples"].items():
        rel = [f"{s[k]:.2f}x" if s[k] is not None else "" for k in ("per_interpreter", "per_import_torch")]
        table.add_row(name, s["command"], str(s["exit_code"]), span(s), *rel)
        for phase, figures in s.get("phases", {}).items():
            table.add_row(f"  {phase}", "(inside the process)", "", span(figures), "", "")
    Console(width=150).print(table)
    if result["census_skipped"]:
        print(f"census_cache_hit skipped: {result['census_skipped']}")
    warmup = result["samples"].get(CENSUS.name, {}).get("warmup")
    if isinstance(warmup, dict):  # the untimed first process: a cache miss where it filled the cache
        hit = "a cache hit" if warmup["cache_hit"] else "a cache miss (it filled the cache)"
        print(f"census warm-up (untimed): {hit}, load_s {warmup['load_s']:.2f}, process {warmup['process_s']:.2f} s")
    for g in result["goals"]:
        verdict = "met" if g["met"] else "MISSED"
        print(f"goal {g['what']} <= {g['limit_s']:g} s: {g['median_s']:.2f} s, {verdict}")
    print(f"load average (1 min) before / after: {result['load_average'][0]:.2f} / {result['load_average'][1]:.2f}")
    for error in result["errors"]:
        print(f"Error: {error}", file=sys.stderr)


class SampleError(MTLError):
    """Samples that went wrong (wrong exit code, traceback, extra output, files left, no cache hit); ``result``:
    the figures of the rest, as ``run`` would have returned them."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


def run(repeats: int, overrides=(), samples: tuple[Sample, ...] | None = None, census: bool = True) -> dict:
    """The samples (default: ``cli_samples`` of this package's train.py) and, with ``census``, the census cache-hit
    sample; prints the table; returns the numbers, or raises SampleError naming each sample that went wrong."""
    from mtl_experiments.bench.timing import PACKAGE_ROOT, interleaved

    if overrides:
        raise ConfigError(f"--startup runs fixed commands and takes no Hydra overrides, got {list(overrides)}.")
    samples = cli_samples(PACKAGE_ROOT / "train.py") if samples is None else samples
    load_before = os.getloadavg()[0]
    for sample in samples:  # untimed warm-up: the OS file cache, .pyc files
        run_sample(sample)
    runs = {s.name: (lambda s=s: run_sample(s)) for s in samples}
    skipped, warmup = census_absent() if census else "not asked for (census=False)", None
    if skipped is None:
        warmup = run_census(warmup=True)  # fills the cache where it is empty
        runs[CENSUS.name] = run_census
    measured = interleaved(runs, repeats)
    errors = [f"{CENSUS.name} warm-up: {warmup}"] if isinstance(warmup, str) else []
    figures = {s.name: summarise(s, measured[s.name], errors) for s in (*samples, CENSUS) if s.name in measured}
    if CENSUS.name in figures:
        figures[CENSUS.name]["warmup"] = warmup
    ratios(figures)
    result = {
        "repeats": repeats,
        "load_average": [load_before, os.getloadavg()[0]],
        "samples": figures,
        "census_skipped": skipped,
        "goals": goals(figures),
        "errors": errors,
    }
    report(result)
    if errors:
        raise SampleError(f"{len(errors)} start-up sample(s) went wrong: {'; '.join(errors)}", result)
    return result


def main(argv: list[str] | None = None) -> int:
    """The census child: ``census``; prints one JSON line."""
    (what,) = sys.argv[1:] if argv is None else argv
    if what != "census":
        raise SystemExit(f"usage: python -m {MODULE} census")
    print(json.dumps(measure_census()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
