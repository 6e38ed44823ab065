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
* :class:`UpdateFilterContract` -- ``update_filter_name``, ``update_filter_config`` (the settings an aggregator sends)
* :class:`CodecContract` -- ``codec_name``, ``codec_config`` (set ``lossless = True`` for an exact codec)

Each suite also has a ``<role>_plugin`` fixture: override it to return a
plugin object (a module, class instance...) to check one that is not
installed.  Each role suite with a config group also composes the plugin's
``<group>/<name>.yaml`` into fedplug's config (``test_config_file_composes``),
and its default ``<role>_config`` is that file's node, interpolations
resolved.  fedplug runs the same suites over every built-in plugin
(``tests/test_contracts.py``); ``docs/plugins.md`` explains every check.
"""

import pytest

# The suites' checks are plain ``assert`` statements: have pytest rewrite them (as it rewrites a
# test module's) so that a failing check shows the values involved, not just its message.
# This must run before the suite modules are imported; the package itself is being imported
# already, so its submodules are named one by one (naming the package would warn).
pytest.register_assert_rewrite(*(
    f"fedplug.testing.{module}"
    for module in ("aggregator", "certs", "checks", "codec", "data", "detector", "loading", "observer", "plugin",
                   "resource_policy", "update_filter")
))

from fedplug.testing.aggregator import AggregatorContract  # noqa: E402
from fedplug.testing.codec import CodecContract  # noqa: E402
from fedplug.testing.detector import DetectorContract  # noqa: E402
from fedplug.testing.observer import ObserverContract, simulate_run  # noqa: E402
from fedplug.testing.resource_policy import ResourcePolicyContract  # noqa: E402
from fedplug.testing.update_filter import UpdateFilterContract  # noqa: E402

__all__ = [
    "AggregatorContract",
    "CodecContract",
    "DetectorContract",
    "ObserverContract",
    "ResourcePolicyContract",
    "simulate_run",
    "UpdateFilterContract",
]
