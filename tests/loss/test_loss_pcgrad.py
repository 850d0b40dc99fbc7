"""PCGrad (Yu et al. 2020, TorchJD's through the adapter) against hand-computed cases."""

from __future__ import annotations

import pytest
from torchjd.aggregation import PCGrad

from mtl_experiments.loss.torchjd import TorchJD
from tests.loss.helpers import f64 as t
from tests.loss.helpers import method, with_yaml_defaults


def test_yaml_instantiates_with_the_papers_defaults():
    w = with_yaml_defaults("pcgrad", TorchJD)
    assert isinstance(w.aggregator, PCGrad)


def test_pcgrad_projects_conflicting_gradients_and_sums():
    # g1' = g1 - (g1·g2/|g2|²) g2 = (1,0) + 0.5·(-1,1) = (0.5, 0.5); g2' = g2 - (g2·g1/|g1|²) g1 = (0, 1)
    # TorchJD's PCGrad sums (the paper's Algorithm 1): update = (0.5, 1.5), i.e. 2·g1 + 1.5·g2
    update, weights = method("pcgrad").aggregate(t([[1, 0], [-1, 1]]))
    assert update.tolist() == pytest.approx([0.5, 1.5], abs=1e-12)
    assert weights.tolist() == pytest.approx([2.0, 1.5], abs=1e-12)


def test_pcgrad_leaves_non_conflicting_gradients_untouched():
    update, weights = method("pcgrad").aggregate(t([[1, 0], [1, 1]]))
    assert update.tolist() == pytest.approx([2.0, 1.0], abs=1e-12)  # the plain sum, as loss=equal
    assert weights.tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
