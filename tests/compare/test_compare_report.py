"""What mtl-compare shows a researcher (issue 16): repeated config+seed runs counted once, unknown --metrics and
short ids, the help text, the baseline's 0.00, the header's experiment, a tabular run's file, and a Pareto plot
with a colour per method, a marker per backbone and labels that do not collide."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.text import Text
from mlflow.entities import Param

from mtl_experiments import compare
from tests.compare.compare_store import EXPERIMENT, log_run
from tests.compare.conftest import copy_store

CROWD = ("pcgrad", "cagrad", "mgda", "nash_mtl", "famo")


@pytest.fixture(scope="module")
def crowded(compare_store, tmp_path_factory):
    """make_store's sweep plus five methods within 0.001 of each other (two backbones), a repeat of the
    shared_bottom/equal seed-0 run (another sweep of the same config), and a run on a tabular file."""
    s = copy_store(compare_store, tmp_path_factory.mktemp("crowded"))
    client = s["client"]
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    for i, loss in enumerate(CROWD):
        for seed in (0, 1):
            backbone = "mmoe" if i % 2 else "shared_bottom"
            log_run(client, exp, backbone, loss, seed, (0.84 + 0.001 * i, 0.45, 0.70 + 0.001 * i, 0.6))
    s["repeat"] = log_run(client, exp, "shared_bottom", "equal", 0, (0.84, 0.45, 0.70, 0.60))
    tab = log_run(client, exp, "mmoe", "equal", 0, (0.7, 0.5, 0.7, 0.5), correlation=0.1)
    client.set_tag(tab, "data", "tabular")
    client.log_batch(tab, params=[Param("data.path", "/data/clicks.csv")])
    s["tabular"] = tab
    return s


def test_a_repeated_config_and_seed_is_counted_once_with_a_warning_naming_the_runs(crowded, capsys):
    """Two sweeps of one config pooled by --experiment gave "n=4, seeds 0,0,1,1" and a shrunken std."""
    c = compare.compare(compare.load_runs(crowded["uri"], experiment=EXPERIMENT))
    (group,) = [g for g in c.groups if crowded["repeat"] in {r.run_id for r in g.runs}]
    assert group.seeds == ["0", "1"]  # the latest seed-0 run replaces the earlier one
    first = crowded["ids"]["mtl_equal"][0]
    assert first not in {r.run_id for r in group.runs}
    (warning,) = c.warnings
    assert first[:8] in warning and crowded["repeat"][:8] in warning and "counted once" in warning
    # hand-computed: y1/auroc over seeds 0 (repeat: 0.84) and 1 (0.86): mean 0.85, std 0.01·√2
    assert group.stat("test/y1/auroc")[:2] == pytest.approx((0.85, 0.0141421356))
    assert compare.main(["--tracking-uri", crowded["uri"], "--experiment", EXPERIMENT]) == 0
    out, err = capsys.readouterr()
    assert f"Warning: runs {first[:8]} repeat" in err and "counted once" in out


def test_unknown_metrics_is_an_error_listing_what_exists(crowded, capsys):
    assert compare.main(["--tracking-uri", crowded["uri"], "--metrics", "auroc,foo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--metrics must name test metrics the runs report, got foo" in err and "auroc, logloss" in err


def test_a_short_parent_id_is_accepted(crowded, capsys):
    assert compare.main(["--tracking-uri", crowded["uri"], "--parent", crowded["parent"][:8]]) == 0
    assert f"parent run `{crowded['parent']}`" in capsys.readouterr().out
    assert compare.main(["--tracking-uri", crowded["uri"], "--parent", "ffffffff"]) == 2
    assert "--parent must be a run id (or its first characters)" in capsys.readouterr().err


def test_help_baseline_zero_header_and_tabular_file(crowded):
    assert "Δm% against" in compare.build_parser().format_help()
    assert "%%" not in compare.build_parser().format_help()
    md = compare.to_markdown(compare.compare(compare.load_runs(crowded["uri"])))  # all experiments searched
    assert md.startswith("# Run comparison: cmp\n")  # the runs' experiment, not MLflow's "Default"
    assert "experiment(s) cmp." in md
    # the 0.9-correlation single-task run is its own baseline: exactly 0, shown unsigned (was "+0.00" / "-0.00")
    assert "| 0.00 | baseline itself |" in md and "-0.00" not in md and "+0.00" not in md
    assert "| tabular (/data/clicks.csv) | mmoe | equal |" in md


def _boxes_overlap(a, b) -> bool:
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def test_pareto_plot_colours_methods_marks_backbones_and_labels_do_not_collide(crowded):
    c = compare.compare(compare.load_runs(crowded["uri"], experiment=EXPERIMENT))
    fig = compare.pareto_plot(c)
    fig.canvas.draw()
    ax = fig.axes[0]
    colours, markers = compare.pareto_styles(c.groups)
    points = [ln for ln in ax.lines if ln.get_marker() in markers.values()]  # not the error bars' caps
    assert len(points) == len(c.groups)
    assert len(set(map(tuple, colours.values()))) == len(colours) == len({g.choices["loss"] for g in c.groups})
    assert len(set(markers.values())) == len(markers) == 3  # shared_bottom, single_task, mmoe
    styles = {(tuple(ln.get_color()), ln.get_marker()) for ln in points}
    expected = {(tuple(colours[g.choices["loss"]]), markers[g.choices["backbone"]]) for g in c.groups}
    assert styles == expected
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]
    assert sorted(t.get_text() for t in labels) == sorted(g.short_label for g in c.groups)
    boxes = [Text.get_window_extent(t, renderer) for t in labels]  # the text, not its leader line
    frame = ax.get_window_extent(renderer)
    for a, b in itertools.combinations(boxes, 2):
        assert not _boxes_overlap(a, b)
    for box in boxes:  # none clipped at the edge
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
