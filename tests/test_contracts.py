"""fedplug's own plugins through the public contract suites (fedplug.testing).

Every built-in plugin declared in fedplug's pyproject.toml is discovered from its
entry point, so a plugin added there is covered without editing this file.
Third-party plugins that happen to be installed are left to their own tests.
"""

from __future__ import annotations

import pytest
import torch

from fedplug import plugins
from fedplug.testing import AggregatorContract, DetectorContract, ObserverContract, ResourcePolicyContract
from fedplug.testing import UpdateFilterContract
from fedplug.testing.loading import default_config

pytest_plugins = ["fedplug.testing.plugin"]

torch.set_num_threads(1)

# Server optimisers take their own step from the clients' mean, so "all clients agree on w"
# does not give w; the suite checks the step's direction instead.
SERVER_OPTIMISERS = {"fedadam", "fedyogi", "fedadagrad"}

# Differential privacy adds noise and clips: the suite checks their plumbing with both turned off (no noise, a
# clip norm no update reaches, the actual number of clients as denominator, integer buffers averaged);
# tests/test_dp_mechanisms.py checks the noise and the clipping themselves.
DP_AGGREGATORS = {"dp_fedavg", "dp_fedavg_adaptive", "ldp_fedavg"}
DP_TRANSPARENT = {"noise_multiplier": 0.0, "clip_norm": 1e9, "initial_clip_norm": 1e9, "denominator": "actual",
                  "integer_buffers": "mean", "noise_seed": 0}

# Tiny variants so that the detector suite trains in seconds on the CPU.
TINY_DETECTORS = {
    "frcnn": {"backbone": "tiny", "min_size": 96, "max_size": 96},
    "yolov3": {"variant": "nano", "img_size": 96},
}


def builtin(role: str) -> list[str]:
    return sorted(
        name
        for name, claimants in plugins.discover(role).items()
        if any(info.package == "fedplug" for info, _ in claimants)
    )


def _ids(names: list[str]) -> list:
    return names or [pytest.param("<none>", marks=pytest.mark.skip(reason="no built-in plugin of this role"))]


@pytest.mark.parametrize("aggregator_name", _ids([n for n in builtin("aggregator")
                                                  if n not in SERVER_OPTIMISERS | DP_AGGREGATORS]))
class TestBuiltinAggregators(AggregatorContract):
    pass


@pytest.mark.parametrize("aggregator_name", _ids([n for n in builtin("aggregator") if n in DP_AGGREGATORS]))
class TestBuiltinDPAggregators(AggregatorContract):
    @pytest.fixture
    def aggregator_config(self, aggregator_name):
        config = default_config("aggregator", aggregator_name)
        return {**config, **{k: v for k, v in DP_TRANSPARENT.items() if k in config}}


@pytest.mark.parametrize("aggregator_name", _ids([n for n in builtin("aggregator") if n in SERVER_OPTIMISERS]))
class TestBuiltinServerOptimisers(AggregatorContract):
    consensus_is_fixed_point = False


@pytest.mark.slow
@pytest.mark.parametrize("detector_name", _ids(builtin("detector")))
class TestBuiltinDetectors(DetectorContract):
    @pytest.fixture
    def detector_config(self, detector_name):
        return {**default_config("detector", detector_name), **TINY_DETECTORS.get(detector_name, {}), "seed": 0}


@pytest.mark.parametrize("resource_policy_name", _ids(builtin("resource_policy")))
class TestBuiltinResourcePolicies(ResourcePolicyContract):
    pass


@pytest.mark.parametrize("observer_name", _ids(builtin("observer")))
class TestBuiltinObservers(ObserverContract):
    pass


@pytest.mark.parametrize("update_filter_name", _ids(builtin("update_filter")))
class TestBuiltinUpdateFilters(UpdateFilterContract):
    @pytest.fixture
    def update_filter_config(self, update_filter_name):  # what dp_fedavg / ldp_fedavg send
        return {"name": update_filter_name, "clip_norm": 0.5, "noise_multiplier": 1.0, "noise_seed": None}


def test_every_role_has_a_builtin_plugin_under_test():
    # Guards against a discovery bug silently turning the suites above into skips.
    for role in ("aggregator", "detector", "resource_policy"):
        assert builtin(role), f"no built-in {role} found through entry points"
    assert "fedavg" in builtin("aggregator")
