"""Hook contract suites for fedplug plugins (public API).

One suite per role.  A plugin's own tests subclass the suite and parametrize
it with the plugin's entry-point name; the suite loads the plugin through its
entry point and calls its hooks through a pluggy manager, exactly as the core
does::

    import pytest
    from fedplug.testing import AggregatorContract

    pytest_plugins = ["fedplug.testing.plugin"]   # the fixtures the suites use

    @pytest.mark.parametrize("aggregator_name", ["my_aggregator"])
    class TestMyAggregator(AggregatorContract):
        pass

Suites, the name each is parametrized with, and the config fixture to override:

* :class:`AggregatorContract` -- ``aggregator_name``, ``aggregator_config``
* :class:`DetectorContract` -- ``detector_name``, ``detector_config`` (give a tiny variant)
* :class:`ResourcePolicyContract` -- ``resource_policy_name``, ``resource_policy_config``
* :class:`ObserverContract` -- ``observer_name``, ``observer_run_config``

Each suite also has a ``<role>_plugin`` fixture: override it to return a
plugin object (a module, class instance...) to check one that is not
installed.  fedplug runs the same suites over every built-in plugin
(``tests/test_contracts.py``); ``docs/plugins.md`` explains every check.
"""

from fedplug.testing.aggregator import AggregatorContract
from fedplug.testing.detector import DetectorContract
from fedplug.testing.observer import ObserverContract, simulate_run
from fedplug.testing.resource_policy import ResourcePolicyContract

__all__ = [
    "AggregatorContract",
    "DetectorContract",
    "ObserverContract",
    "ResourcePolicyContract",
    "simulate_run",
]
