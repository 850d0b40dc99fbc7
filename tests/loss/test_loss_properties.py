"""Every conf/loss/*.yaml checked for the properties it promises (tests/loss/property_testers.py says which, and why
a method is exempt), on many random inputs; and every method has its own test file of known values."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_experiments.tasks import build_tasks
from tests.conftest import options
from tests.loss import property_testers as pt
from tests.loss.helpers import method

NAMES = options("loss")


def cases(properties: tuple[str, ...], aggregators: bool) -> list:
    """``(name, property, dtype)`` for every method of the kind and every property it promises, each known defect
    marked ``xfail(strict=True)``."""
    out = []
    for name in NAMES:
        if pt.is_aggregator(name) != aggregators:
            continue
        for prop in properties:
            if not pt.promises(name, prop):
                continue
            for dtype in [pt.ONE_DTYPE[prop]] if prop in pt.ONE_DTYPE else pt.DTYPES:
                reason = pt.KNOWN_DEFECTS.get((name, prop, dtype)) or pt.KNOWN_DEFECTS.get((name, prop, None))
                marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
                out.append(pytest.param(name, prop, dtype, marks=marks, id=f"{name}-{prop}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize(("name", "prop", "dtype"), cases(pt.AGGREGATOR_PROPERTIES, aggregators=True))
def test_aggregator_property(name, prop, dtype):
    bad = pt.check_aggregator(name, prop, dtype)
    assert bad == [], f"{name} breaks {prop} on {len(bad)} case(s):\n" + "\n".join(bad)


@pytest.mark.parametrize(("name", "prop", "dtype"), cases(pt.LOSS_PROPERTIES, aggregators=False))
def test_loss_level_property(name, prop, dtype):
    bad = pt.check_losses(name, prop, dtype)
    assert bad == [], f"{name} breaks {prop} on {len(bad)} case(s):\n" + "\n".join(bad)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_has_its_test_file_and_every_exemption_names_a_method(name):
    here = Path(__file__).parent
    assert (here / f"test_loss_{name}.py").is_file(), f"add tests/loss/test_loss_{name}.py with its known-value tests"
    for prop, exempt in pt.EXEMPT.items():
        assert set(exempt) - {"*"} <= set(NAMES), (prop, sorted(set(exempt) - {"*"} - set(NAMES)))
    for defect in pt.KNOWN_DEFECTS:
        assert defect[0] in NAMES, defect


@pytest.mark.parametrize("name", sorted(pt.RANDOMISED))
def test_random_order_is_reproducible_and_isolated_from_the_global_rng(name):
    four = build_tasks({k: {"kind": "binary"} for k in "abcd"})
    torch.manual_seed(1)
    state = torch.get_rng_state()
    first = pt.random_order_outputs(method(name, four))
    assert torch.equal(torch.get_rng_state(), state), "the global RNG must not be consumed or reseeded"
    torch.manual_seed(2)  # a different global state gives the same draws
    second = pt.random_order_outputs(method(name, four))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert len({tuple(u.tolist()) for u in first}) > 1, "the order is drawn anew every step"
    other = pt.random_order_outputs(method(name, four, seed=1))
    assert any(not torch.equal(a, b) for a, b in zip(first, other, strict=True))
