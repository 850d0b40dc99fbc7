"""Grouping runs over seeds: runs whose configuration params agree (all but the seed-following and
per-run ones) form one group, and the columns that vary across groups are the ones shown."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mtl_experiments.compare.runs import RunData
from mtl_experiments.compare.stats import mean_std

# Params that follow the run's seed: runs differing only in these are repeats of one configuration.
SEED_PARAMS = frozenset({"seed", "data.shuffle_seed", "loss.seed"})
# Params that differ per run but are not configuration (output locations, a resumed checkpoint, names and
# tags the user gives runs): runs differing only in these still group together.
PER_RUN_PARAMS = frozenset(
    {
        "run_name",
        "logger.mlflow.run_name",
        "logger.mlflow.tracking_uri",
        "logger.mlflow.synchronous",  # how metrics were written (thread, queue), not what was trained
        "logger.mlflow.max_queued",
        "paths.output_dir",
        "trainer.default_root_dir",
        "callbacks.model_checkpoint.dirpath",
        "callbacks.last_checkpoint.dirpath",
        "ckpt_path",
        "resume",
    }
)
PER_RUN_PREFIXES = ("hydra.", "logger.mlflow.tags")
# Choice tags always shown; other Hydra choice tags are shown when they vary.
MAIN_CHOICES = ("data", "backbone", "loss")
STL_BACKBONE = "single_task"


def config_params(params: Mapping[str, str]) -> dict[str, str]:
    """The params that define a configuration: all but the seed-following and per-run ones."""
    return {
        k: v
        for k, v in params.items()
        if k not in SEED_PARAMS and k not in PER_RUN_PARAMS and not k.startswith(PER_RUN_PREFIXES)
    }


def group_key(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(config_params(params).items()))


def data_key(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The data config: every ``data.*`` param except ``data.shuffle_seed`` (which follows the seed)."""
    return tuple(sorted((k, v) for k, v in params.items() if k.startswith("data.") and k != "data.shuffle_seed"))


def _is_choice_tag(key: str) -> bool:
    # Hydra's choices are logged as plain tags named after the config group (no dots); everything else
    # (mlflow.*, version.*, loss.<option>, mtl.*) is namespaced, and `overrides` differs per seed.
    return "." not in key and key != "overrides"


@dataclass
class Group:
    """Runs that differ only by seed."""

    key: tuple[tuple[str, str], ...]
    runs: list[RunData]
    label: str = ""  # what varies across groups: method part (short_label) + data part (data_label)
    short_label: str = ""
    data_label: str = ""
    baseline: Group | None = None
    delta_m_note: str = ""
    delta_m_keys: list[str] = field(default_factory=list)
    delta_m_values: list[float] = field(default_factory=list)

    @property
    def params(self) -> dict[str, str]:
        return dict(self.key)

    @property
    def choices(self) -> dict[str, str]:
        out: dict[str, list[str]] = defaultdict(list)
        for run in self.runs:
            for k, v in run.tags.items():
                if _is_choice_tag(k) and v not in out[k]:
                    out[k].append(v)
        return {k: "|".join(v) for k, v in out.items()}

    def shown(self, column: str) -> str:
        """A choice column's cell: ``data`` names the file a file-backed dataset read (``tabular (clicks.csv)``)."""
        value = self.choices.get(column, "")
        path = self.params.get("data.path") if column == "data" else None
        return f"{value} ({path})" if path and path != "None" else value

    @property
    def seeds(self) -> list[str]:
        return sorted((r.params.get("seed", "?") for r in self.runs), key=lambda s: (len(s), s))

    @property
    def is_single_task(self) -> bool:
        backbone = self.choices.get("backbone")
        if backbone is not None:
            return backbone == STL_BACKBONE
        return f".{STL_BACKBONE}." in self.params.get("backbone._target_", "")

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if metric in r.metrics]

    def stat(self, metric: str) -> tuple[float, float, int]:
        values = self.values(metric)
        return (*mean_std(values), len(values))


def seed_key(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The values of the seed-following params: two runs of one group with equal seed keys are one sample."""
    return tuple(sorted((k, v) for k, v in params.items() if k in SEED_PARAMS))


def drop_duplicates(runs: Iterable[RunData]) -> tuple[list[RunData], list[str]]:
    """(runs with each configuration + seed once, one warning per repeat). Runs of identical config and seed (the
    same sweep run twice, into one experiment) are not independent samples: counting both would shrink the std
    over seeds. The latest started is kept."""
    latest: dict[tuple, list[RunData]] = defaultdict(list)
    for run in sorted(runs, key=lambda r: (r.start_time, r.run_id)):
        latest[(group_key(run.params), seed_key(run.params))].append(run)
    kept, warnings = [], []
    for (_, seeds), same in latest.items():
        kept.append(same[-1])
        if len(same) > 1:
            seed = ", ".join(f"{k}={v}" for k, v in seeds) or "no seed"
            others = ", ".join(r.run_id[:8] for r in same[:-1])
            warnings.append(
                f"runs {others} repeat the config and {seed} of run {same[-1].run_id[:8]}; counted once "
                "(the latest); select one sweep with --parent to compare it alone."
            )
    kept.sort(key=lambda r: (r.start_time, r.run_id))
    return kept, warnings


def group_runs(runs: Iterable[RunData]) -> list[Group]:
    """Runs grouped by configuration (all params but the seed-following and per-run ones), in first-run order."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = group_key(run.params)
        groups.setdefault(key, Group(key, []))
        groups[key].runs.append(run)
    return list(groups.values())


def varying_columns(groups: Sequence[Group]) -> tuple[list[str], list[str]]:
    """(choice tags, params) to show: ``data``/``backbone``/``loss`` and any other choice that varies; params
    that vary *within* one value of their group's choice (``loss.c`` across two CAGrad groups, or
    ``data.correlation``), not those a choice already explains (``loss.weights`` exists only for
    ``loss=fixed``); ``_target_`` params and params whose values repeat a shown column's are omitted."""
    choice_values = [g.choices for g in groups]
    keys = sorted({k for c in choice_values for k in c})
    choices = [k for k in MAIN_CHOICES if k in keys]
    choices += [k for k in keys if k not in MAIN_CHOICES and len({c.get(k) for c in choice_values}) > 1]
    params: list[str] = []
    seen_vectors = set()
    all_keys = sorted({k for g in groups for k in g.params}, key=lambda k: (k.count("."), k))
    for key in all_keys:
        if key.endswith("._target_") or key == "_target_":
            continue
        vector = tuple(g.params.get(key) for g in groups)
        if len(set(vector)) < 2 or vector in seen_vectors:
            continue
        prefix = key.split(".", 1)[0]
        if "." in key and prefix in keys:
            # shown only if it varies among groups with the same choice of its config group
            by_choice: dict[str | None, set] = defaultdict(set)
            for c, v in zip(choice_values, vector, strict=True):
                by_choice[c.get(prefix)].add(v)
            if all(len(vs) < 2 for vs in by_choice.values()):
                continue
        params.append(key)
        seen_vectors.add(vector)
    return choices, params
