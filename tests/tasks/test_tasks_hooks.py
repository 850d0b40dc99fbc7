"""The hooks through which datasets and serving use a task without knowing its kind by name (tasks/base.py):
``label_type`` / ``encode_labels`` / ``fit_classes`` for datasets, ``pointwise`` / ``item_scores`` /
``catalogue_scores`` / ``fusions`` / ``fused_by_default`` for recommend.py. Every kind enrols itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtl_experiments.data.spec import ItemInfo, LabelType
from mtl_experiments.errors import DataError
from mtl_experiments.tasks import available_kinds, build_task

# what serving did by kind name before the hooks (recommend.py's FUSABLE / DEFAULT_FUSED tables)
FUSIONS = {"binary": {"product", "sum"}, "regression": {"sum"}, "multiclass": set(), "retrieval": {"product", "sum"}}
DEFAULT_FUSED = {"binary": {"product", "sum"}, "regression": {"sum"}, "multiclass": set(), "retrieval": set()}
LABEL_TYPES = {
    "binary": LabelType.BINARY,
    "regression": LabelType.REAL,
    "multiclass": LabelType.CLASS,
    "retrieval": LabelType.ITEM,
}
NUM_ITEMS = 12


def ready(kind: str):
    """A task of ``kind`` set up on small labels, with its head built: ``(task, head)``."""
    task = build_task("t", {"kind": kind})
    labels = {"multiclass": torch.tensor([0, 1, 2, 3]), "retrieval": torch.tensor([1, 2, 12, 3])}
    task.setup(labels.get(kind, torch.tensor([0.0, 1.0, 1.0, 0.0])), ItemInfo(NUM_ITEMS))
    torch.manual_seed(0)
    return task, task.head(5)


@pytest.mark.parametrize("kind", available_kinds())
def test_every_kind_declares_its_hooks(kind):
    task = build_task("t", {"kind": kind})
    assert isinstance(task.label_type, LabelType)
    assert task.fused_by_default <= task.fusions <= {"product", "sum"}
    assert isinstance(task.pointwise, bool)


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_hooks_reproduce_what_was_decided_by_kind_name(kind):
    task = build_task("t", {"kind": kind})
    assert task.label_type is LABEL_TYPES[kind]
    assert set(task.fusions) == FUSIONS[kind] and set(task.fused_by_default) == DEFAULT_FUSED[kind]
    assert task.pointwise == (kind != "retrieval")


@pytest.mark.parametrize("kind", sorted(FUSIONS))
def test_encode_labels_gives_the_label_types_dtype(kind):
    task = build_task("t", {"kind": kind})
    expected = torch.int64 if kind in ("multiclass", "retrieval") else torch.float32
    for column in (np.array([0, 1, 1], dtype=np.int64), np.array([0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])):
        out = task.encode_labels(column)
        assert out.dtype == expected and out.tolist() == [0, 1, 1]
    same = np.array([1, 0], dtype=np.float32 if expected == torch.float32 else np.int64)
    assert task.encode_labels(same).data_ptr() == torch.from_numpy(same).data_ptr()  # no copy when it fits


@pytest.mark.parametrize("kind", ["binary", "regression", "multiclass"])
def test_pointwise_item_scores_are_one_score_per_row(kind):
    task, head = ready(kind)
    output = head(torch.randn(6, 5))
    scores = task.item_scores(output)
    assert scores.shape == (6,)
    if kind == "multiclass":  # the most likely class: shown, never fused
        assert torch.equal(scores, task.predict(output).argmax(-1))
    else:
        assert torch.equal(scores, task.predict(output))
    with pytest.raises(NotImplementedError, match="item_scores"):
        task.catalogue_scores(output)


def test_retrieval_catalogue_scores_are_a_softmax_over_the_items():
    task, head = ready("retrieval")
    output = head(torch.randn(3, 5))
    probs = task.catalogue_scores(output)
    assert probs.shape == (3, NUM_ITEMS) and probs.dtype == torch.float64
    assert torch.allclose(probs.sum(-1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(probs.argmax(-1), task.predict(output).argmax(-1))  # column j = item j + 1
    one = output[:1]  # serving scores one query: the same probabilities as before the hook, bit for bit
    assert torch.equal(task.catalogue_scores(one)[0], torch.softmax(task.predict(one)[0].double(), dim=0))


def test_fit_classes_adopts_or_checks_the_class_count():
    task = build_task("g", {"kind": "multiclass"})
    task.fit_classes(4, ["a", "b", "c", "d"])
    assert task.num_classes == 4
    fixed = build_task("g", {"kind": "multiclass", "num_classes": 3})
    fixed.fit_classes(2)
    assert fixed.num_classes == 3
    with pytest.raises(DataError, match=r"num_classes=3, but its label column 'g' has 5 classes \(0..4\)"):
        fixed.fit_classes(5)
    with pytest.raises(DataError, match=r"has 4 classes \['a', 'b', 'c', 'd'\]; raise data.tasks.g.num_classes"):
        fixed.fit_classes(4, ["a", "b", "c", "d"])
    build_task("y", {"kind": "binary"}).fit_classes(9)  # other kinds have no classes to fit
