"""The resource-policy contract: ``fedplug_measure_resources`` and ``fedplug_select_clients``.

Subclass :class:`ResourcePolicyContract` and parametrize it with your plugin's
name::

    @pytest.mark.parametrize("resource_policy_name", ["my_policy"])
    class TestMyPolicy(ResourcePolicyContract):
        pass

Measurement runs on a client in a worker thread and must answer within about a
second (the suite allows ``measure_limit_s``); selection runs on the server's
event loop and must never block (``select_limit_s``).  Reports and the list of
contacted clients are passed as read-only views: a policy must not modify them.
"""

from __future__ import annotations

import math
import time
import types
from typing import Any, ClassVar, Mapping, Sequence

import pytest

from fedplug.testing.loading import check_config_file, default_config, plugin_manager
from fedplug.types import ResourceDecision, ResourceReport

CONTACTED = ("client-a", "client-b", "client-c", "client-d")


class ResourcePolicyContract:
    """Checks every resource policy must pass; see the module docstring for use."""

    measure_limit_s: ClassVar[float] = 2.0
    select_limit_s: ClassVar[float] = 0.5

    # -- fixtures a subclass provides or overrides -------------------------

    @pytest.fixture
    def resource_policy_name(self) -> str:
        pytest.fail(
            "parametrize the suite with your plugin's name: "
            '@pytest.mark.parametrize("resource_policy_name", ["<name>"])'
        )

    @pytest.fixture
    def resource_policy_plugin(self) -> object | None:
        """``None``: load the plugin by name from its entry point; else this object is the plugin."""
        return None

    @pytest.fixture
    def resource_policy_config(self, resource_policy_name: str) -> dict[str, Any]:
        return default_config("resource_policy", resource_policy_name)

    @pytest.fixture
    def resource_policy_hook(self, resource_policy_name: str, resource_policy_plugin: object | None):
        return plugin_manager("resource_policy", resource_policy_name, resource_policy_plugin).hook

    @pytest.fixture
    def select(self, resource_policy_hook, resource_policy_config):
        """Call ``fedplug_select_clients`` as the server does, timing it and checking the answer."""

        def call(reports: Mapping[str, ResourceReport], contacted: Sequence[str] = CONTACTED) -> ResourceDecision:
            start = time.perf_counter()
            decision = resource_policy_hook.fedplug_select_clients(
                reports=types.MappingProxyType(dict(reports)),
                contacted=tuple(contacted),
                config=dict(resource_policy_config),
            )
            took = time.perf_counter() - start
            assert took < self.select_limit_s, (
                f"fedplug_select_clients took {took:.2f} s; it runs on the server's event loop "
                f"and must return within {self.select_limit_s} s"
            )
            self._check_decision(decision, contacted)
            return decision

        return call

    # -- the config file -------------------------------------------------------

    def test_config_file_composes(self, resource_policy_name):
        """``resource_policy/<name>.yaml`` composes into fedplug's config (skipped without one)."""
        check_config_file("resource_policy", resource_policy_name)

    # -- measurement -----------------------------------------------------------

    def test_measure_returns_a_valid_report_quickly(self, resource_policy_hook, resource_policy_config):
        for attempt in range(2):  # the first sample of a load meter is often special
            start = time.perf_counter()
            report = resource_policy_hook.fedplug_measure_resources(config=dict(resource_policy_config))
            took = time.perf_counter() - start
            assert took < self.measure_limit_s, (
                f"fedplug_measure_resources took {took:.2f} s (call {attempt + 1}); the limit is {self.measure_limit_s} s"
            )
            assert isinstance(report, ResourceReport), (
                f"fedplug_measure_resources returned {type(report).__name__}, not a ResourceReport"
            )
            load = report.load
            assert isinstance(load, (int, float)) and math.isfinite(load) and 0.0 <= load <= 1.0, (
                f"load is {load!r}; it must be a number within [0, 1]"
            )
            assert isinstance(report.details, Mapping), (
                f"ResourceReport.details is a {type(report.details).__name__}; it must be a mapping of names to numbers"
            )
            for key, value in dict(report.details).items():
                assert isinstance(key, str) and isinstance(value, (int, float)), (
                    f"details[{key!r}] = {value!r}: details are numbers by name (they go into a JSON message)"
                )

    # -- selection -------------------------------------------------------------

    def test_selection_is_a_subset_of_contacted(self, select):
        reports = {c: ResourceReport(load=load) for c, load in zip(CONTACTED, (0.0, 0.1, 0.5, 0.95))}
        # A report from a client that was not asked this round (a late or confused peer).
        reports["client-not-contacted"] = ResourceReport(load=0.0)
        select(reports)

    def test_all_idle_clients_can_take_part(self, select):
        decision = select({c: ResourceReport(load=0.0) for c in CONTACTED})
        assert decision.proceed and decision.selected, (
            "with every contacted client idle (load 0) the policy refused the round: "
            f"{decision.reason or 'no reason given'}"
        )

    def test_handles_missing_reports(self, select):
        select({CONTACTED[0]: ResourceReport(load=0.0), CONTACTED[2]: ResourceReport(load=0.2)})
        select({})

    def test_selection_is_fast_with_many_clients(self, select):
        many = [f"client-{i}" for i in range(1000)]
        select({c: ResourceReport(load=(i % 10) / 10) for i, c in enumerate(many)}, contacted=many)

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _check_decision(decision: Any, contacted: Sequence[str]) -> None:
        assert isinstance(decision, ResourceDecision), (
            f"fedplug_select_clients returned {type(decision).__name__}, not a ResourceDecision"
        )
        assert isinstance(decision.selected, (tuple, list)), (
            f"ResourceDecision.selected is a {type(decision.selected).__name__}; it must be a tuple of client ids"
        )
        selected = tuple(decision.selected)
        assert all(isinstance(c, str) for c in selected), f"selected holds non-strings: {selected!r}"
        strangers = sorted(set(selected) - set(contacted))
        assert not strangers, f"selected clients that were not contacted this round: {strangers}"
        assert len(set(selected)) == len(selected), f"selected names a client twice: {selected!r}"
        assert isinstance(decision.proceed, bool), f"proceed is {decision.proceed!r}, not a bool"
        if decision.proceed:
            assert selected, "proceed=True with no client selected: a round needs at least one client"
