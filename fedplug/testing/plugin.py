"""Opt-in pytest plugin with the fixtures the contract suites use.

Enable it in the test module (or the root ``conftest.py``) that uses a suite::

    pytest_plugins = ["fedplug.testing.plugin"]

It is deliberately *not* declared as a ``pytest11`` entry point: installing
fedplug must not change how anyone else's test session runs.

Fixtures
--------
``fedplug_state_dict``
    a tiny model's full state (float parameters, BatchNorm statistics, an
    ``int64`` ``num_batches_tracked``): the global weights of aggregator checks.
``fedplug_client_updates``
    three :class:`~fedplug.types.ClientUpdate` values around it with unequal
    example counts (10, 20, 30).
``fedplug_make_detection_dataset``
    a factory ``(count, num_classes, size, seed) ->`` in-memory detection
    dataset of coloured rectangles.
``fedplug_detection_dataset``
    two such images, two classes, 80×96 px.
``fedplug_run_dir``
    an empty temporary run directory.
``fedplug_cache``
    a per-session dict for results that are expensive to compute (one
    training round shared by several detector checks).

It also registers the ``slow`` marker and puts it on the suites' checks that
train more than once (run them or not with ``-m "not slow"``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fedplug.testing.data import SyntheticDetectionDataset, make_updates, sample_state_dict


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: trains a model or runs a federation (seconds to minutes)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if getattr(getattr(item, "function", None), "_fedplug_slow", False):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def fedplug_state_dict():
    return sample_state_dict(0)


@pytest.fixture
def fedplug_client_updates(fedplug_state_dict):
    return make_updates(fedplug_state_dict, count=3)


@pytest.fixture
def fedplug_make_detection_dataset():
    def make(count: int = 2, num_classes: int = 2, size: tuple[int, int] = (80, 96), seed: int = 0):
        return SyntheticDetectionDataset(count=count, num_classes=num_classes, size=size, seed=seed)

    return make


@pytest.fixture
def fedplug_detection_dataset(fedplug_make_detection_dataset):
    return fedplug_make_detection_dataset()


@pytest.fixture
def fedplug_run_dir(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir


@pytest.fixture(scope="session")
def fedplug_cache() -> dict:
    return {}
