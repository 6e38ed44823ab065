"""activate() checks each plugin against its role's hooks, and every message says what to do.

The broken plugins below are declared through fake entry points (nothing is
installed), so they are found, imported and refused exactly as an installed
third-party package would be.
"""

from __future__ import annotations

import sys
import textwrap
from importlib import metadata

import pytest

from fedplug import hooks, plugins
from fedplug.plugins import PluginError, activate

MODULE = "fedplug_toys_activation"
PACKAGE = "fedplug-toys"

TOYS = textwrap.dedent('''
    from fedplug.hooks import hookimpl
    from fedplug.types import ResourceDecision, ResourceReport


    class OnlyRoundSettings:                      # an aggregator without fedplug_aggregate
        @hookimpl
        def fedplug_aggregator_round_settings(self, round_number, config):
            return None


    class Undecorated:                            # forgot @hookimpl
        def fedplug_aggregate(self, global_weights, updates):
            return global_weights


    class UndecoratedOptional:                    # the optional hook would be silently ignored
        @hookimpl
        def fedplug_aggregate(self, global_weights, updates):
            return global_weights

        def fedplug_aggregator_round_settings(self, round_number, config):
            return {"proximal_mu": 0.1}


    class MisspeltRequired:                       # a typo in the required hook's name, marked
        @hookimpl
        def fedplug_agregate(self, global_weights, updates):
            return global_weights


    class MisspeltUnmarked:                       # a typo in the required hook's name, not marked
        def fedplug_agregate(self, global_weights, updates):
            return global_weights


    class DetectorWithoutEvaluate:
        @hookimpl
        def fedplug_build_model(self, config, class_names):
            return None

        @hookimpl
        def fedplug_train_round(self, model, dataset, settings):
            return None


    class Policy:
        @hookimpl
        def fedplug_measure_resources(self, config):
            return ResourceReport(load=0.0)

        @hookimpl
        def fedplug_select_clients(self, reports, contacted):
            return ResourceDecision(tuple(contacted), True)


    class PolicyWithMisspeltHook(Policy):
        @hookimpl
        def fedplug_select_client(self, reports, contacted):
            return ResourceDecision(tuple(contacted), True)


    class Logger:
        @hookimpl
        def fedplug_round_end(self, record):
            pass


    class ObserverSelectingClients(Logger):       # would answer instead of the selected policy
        @hookimpl
        def fedplug_select_clients(self, reports, contacted):
            return ResourceDecision((), False, "the observer says no")


    class ObserverWithMisspeltHook:
        @hookimpl
        def fedplug_round_ended(self, record):
            pass


    class ObserverWithWrongArgument:
        @hookimpl
        def fedplug_round_start(self, round_number, clients):
            pass


    class ObserverUndecorated:
        def fedplug_run_end(self, rounds):
            pass


    class ObserverWithoutHooks:
        def on_round_end(self, record):
            pass


    only_round_settings = OnlyRoundSettings()
    undecorated = Undecorated()
    undecorated_optional = UndecoratedOptional()
    misspelt_required = MisspeltRequired()
    misspelt_unmarked = MisspeltUnmarked()
    detector_without_evaluate = DetectorWithoutEvaluate()
    policy = Policy()
    policy_with_misspelt_hook = PolicyWithMisspeltHook()
    logger = Logger()
    observer_selecting_clients = ObserverSelectingClients()
    observer_with_misspelt_hook = ObserverWithMisspeltHook()
    observer_with_wrong_argument = ObserverWithWrongArgument()
    observer_undecorated = ObserverUndecorated()
    observer_without_hooks = ObserverWithoutHooks()
''')


@pytest.fixture
def toys(monkeypatch, tmp_path):
    """``declare(role, name, attr)`` declares ``MODULE:attr`` as plugin ``name`` of ``PACKAGE``."""
    (tmp_path / f"{MODULE}.py").write_text(TOYS)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra: dict[str, list] = {}
    real = plugins._entry_points
    monkeypatch.setattr(plugins, "_entry_points", lambda group: real(group) + extra.get(group, []))

    def declare(role: str, name: str, target: str, package: str = PACKAGE) -> None:
        group = plugins.ROLE_GROUPS[role]
        value = target if ":" in target or "." in target else f"{MODULE}:{target}"
        extra.setdefault(group, []).append((metadata.EntryPoint(name, value, group), package, "0.3"))

    yield declare
    sys.modules.pop(MODULE, None)


def refusal(selection, **kwargs) -> str:
    with pytest.raises(PluginError) as info:
        activate(selection, **kwargs)
    return str(info.value)


def assert_names(text: str, *parts: str) -> None:
    for part in parts:
        assert part in text, f"{part!r} is missing from the message:\n{text}"


# -- role plugins ---------------------------------------------------------------


def test_missing_required_hook_names_plugin_package_and_hook(toys):
    toys("aggregator", "no_aggregate", "only_round_settings")
    text = refusal({"aggregator": "no_aggregate"}, observers=False)
    assert_names(text, "aggregator 'no_aggregate'", PACKAGE, "does not implement fedplug_aggregate",
                 "@fedplug.hooks.hookimpl")


def test_missing_one_of_the_detectors_hooks(toys):
    toys("detector", "half_detector", "detector_without_evaluate")
    text = refusal({"detector": "half_detector"}, observers=False)
    assert_names(text, "detector 'half_detector'", PACKAGE, "fedplug_evaluate", "@fedplug.hooks.hookimpl")


def test_function_without_hookimpl_is_named_as_such(toys):
    toys("aggregator", "undecorated", "undecorated")
    text = refusal({"aggregator": "undecorated"}, observers=False)
    assert_names(text, "aggregator 'undecorated'", PACKAGE,
                 "has a function fedplug_aggregate but it is not marked @hookimpl")


def test_optional_hook_without_hookimpl_is_refused_too(toys):
    toys("aggregator", "undecorated_optional", "undecorated_optional")
    text = refusal({"aggregator": "undecorated_optional"}, observers=False)
    assert_names(text, "has a function fedplug_aggregator_round_settings but it is not marked @hookimpl")


def test_misspelt_marked_hook_gets_did_you_mean(toys):
    toys("aggregator", "misspelt", "misspelt_required")
    text = refusal({"aggregator": "misspelt"}, observers=False)
    assert_names(text, "aggregator 'misspelt'", PACKAGE, "fedplug_agregate", "not a fedplug hook",
                 "Did you mean 'fedplug_aggregate'?")


def test_misspelt_unmarked_hook_gets_did_you_mean(toys):
    toys("aggregator", "misspelt_unmarked", "misspelt_unmarked")
    text = refusal({"aggregator": "misspelt_unmarked"}, observers=False)
    assert_names(text, "does not implement fedplug_aggregate", "It has a function fedplug_agregate",
                 "did you mean fedplug_aggregate?")


def test_misspelt_extra_hook_of_a_policy(toys):
    toys("resource_policy", "typo_policy", "policy_with_misspelt_hook")
    text = refusal({"resource_policy": "typo_policy"}, observers=False)
    assert_names(text, "resource_policy 'typo_policy'", PACKAGE, "fedplug_select_client",
                 "Did you mean 'fedplug_select_clients'?")


def test_a_complete_plugin_activates(toys):
    toys("resource_policy", "toy_policy", "policy")
    active = activate({"resource_policy": "toy_policy"}, observers=False)
    assert active.selected["resource_policy"].package == PACKAGE


@pytest.mark.parametrize("role", ["aggregator", "detector", "resource_policy", "observer"])
def test_every_builtin_plugin_passes_the_checks(role):
    for name, claimants in plugins.discover(role).items():
        if claimants[0][0].package != "fedplug":
            continue
        info, obj = plugins.load_plugin(role, name)
        plugins.check_plugin(info, obj)


def test_role_tables_cover_every_hook_spec():
    specs = {n: getattr(hooks, n) for n in plugins.HOOK_SPECS}
    firstresult = {n for n, f in specs.items() if f.fedplug_spec["firstresult"]}
    assert set(plugins.ROLE_OF_HOOK) == firstresult, "every firstresult hook belongs to exactly one role"
    assert set(plugins.OBSERVER_HOOKS) == set(specs) - firstresult
    for role, required in plugins.REQUIRED_HOOKS.items():
        assert set(required) <= set(specs)
    assert "fedplug_aggregator_round_settings" not in plugins.REQUIRED_HOOKS["aggregator"]


# -- observers ------------------------------------------------------------------


def test_observer_implementing_a_role_hook_is_refused(toys):
    toys("observer", "nosy", "observer_selecting_clients")
    text = refusal({"resource_policy": "always"})
    assert_names(text, "observer 'nosy'", PACKAGE, "fedplug_select_clients", "resource_policy",
                 "plugins.disable=[nosy]")


def test_observer_with_misspelt_hook_names_package_entry_point_and_the_right_hook(toys):
    toys("observer", "typo_logger", "observer_with_misspelt_hook")
    text = refusal({"aggregator": "fedavg"})
    assert_names(text, "observer 'typo_logger'", PACKAGE, f"{MODULE}:observer_with_misspelt_hook",
                 "fedplug_round_ended", "Did you mean 'fedplug_round_end'?", "plugins.disable=[typo_logger]")
    assert " object at 0x" not in text


def test_observer_with_a_wrong_argument_name(toys):
    toys("observer", "wrong_arg", "observer_with_wrong_argument")
    text = refusal({"aggregator": "fedavg"})
    assert_names(text, "observer 'wrong_arg'", PACKAGE, "fedplug_round_start", "'clients'",
                 "Did you mean 'client_ids'?", "plugins.disable=[wrong_arg]")


def test_observer_with_undecorated_hook(toys):
    toys("observer", "plain", "observer_undecorated")
    text = refusal({"aggregator": "fedavg"})
    assert_names(text, "observer 'plain'", "has a function fedplug_run_end but it is not marked @hookimpl",
                 "plugins.disable=[plain]")


def test_observer_without_any_hook(toys):
    toys("observer", "idle", "observer_without_hooks")
    text = refusal({"aggregator": "fedavg"})
    assert_names(text, "observer 'idle'", "implements no fedplug hook", "plugins.disable=[idle]")


def test_observer_that_fails_to_import_names_package_entry_point_and_disable(toys):
    toys("observer", "broken_logger", "fedplug_no_such_module_anywhere.logger")
    text = refusal({"aggregator": "fedavg"})
    assert_names(text, "observer 'broken_logger'", PACKAGE, "fedplug_no_such_module_anywhere.logger",
                 "fedplug.observers", "plugins.disable=[broken_logger]", "Traceback")


def test_a_broken_observer_can_be_disabled(toys):
    toys("observer", "nosy", "observer_selecting_clients")
    toys("observer", "logger", "logger")
    active = activate({"resource_policy": "always"}, disabled=["nosy"])
    assert [o.name for o in active.observers] == ["logger", "plots", "tensorboard"]
    active = activate({"resource_policy": "always"}, disabled=["observer:nosy", "plots"])
    assert [o.name for o in active.observers] == ["logger", "tensorboard"]


def test_disable_refuses_a_name_that_is_no_installed_observer(toys):
    toys("observer", "model_drift", "logger")
    text = refusal({"aggregator": "fedavg"}, disabled=["model_drfit"])
    assert_names(text, "'model_drfit'", "not an installed observer", "model_drift", "plots",
                 "Did you mean 'model_drift'?")


def test_disable_refuses_a_role_plugin_name():
    text = refusal({"aggregator": "fedavg"}, disabled=["fedavg"])
    assert_names(text, "'fedavg'", "not an installed observer", "plots", "aggregator=<name>")


# -- name clashes -----------------------------------------------------------------


def test_clash_with_a_builtin_tells_the_other_package_to_rename(toys):
    toys("aggregator", "fedavg", "undecorated", package="fedplug-fancy")
    text = refusal({"aggregator": "fedavg"}, observers=False)
    assert_names(text, "fedplug-fancy 0.3", "fedplug 0.1.0", "built-in fedplug aggregator",
                 "fedplug-fancy must rename its entry point", "pip uninstall fedplug-fancy")
    assert "pip uninstall fedplug " not in text and "Uninstall one of them" not in text


def test_clash_between_two_third_party_packages_names_both(toys):
    toys("aggregator", "median2", "undecorated", package="pkg-a")
    toys("aggregator", "median2", "undecorated", package="pkg-b")
    text = refusal({"aggregator": "median2"}, observers=False)
    assert_names(text, "pkg-a 0.3", "pkg-b 0.3", "Rename the entry point 'median2'", "pip uninstall pkg-a",
                 "pip uninstall pkg-b")


def test_unknown_name_offers_did_you_mean():
    with pytest.raises(PluginError) as info:
        plugins.load_plugin("aggregator", "fedavgg")
    assert "Did you mean 'fedavg'" in str(info.value)
