"""Plugin discovery and selection errors."""

import sys
import textwrap
from importlib import metadata

import pytest

from fedplug import plugins
from fedplug.plugins import PluginError, activate, list_plugins, load_plugin


def test_builtins_are_found_through_entry_points():
    found = {(p.role, p.name) for p in list_plugins()}
    for expected in [("aggregator", "fedavg"), ("detector", "frcnn"), ("detector", "yolov3"),
                     ("resource_policy", "cpu_load"), ("resource_policy", "gpu_load"),
                     ("resource_policy", "always")]:
        assert expected in found
    assert all(p.package == "fedplug" for p in list_plugins() if p.name == "fedavg")


def test_unknown_name_lists_the_installed_ones_and_their_package():
    with pytest.raises(PluginError) as info:
        load_plugin("aggregator", "fedbogus")
    text = str(info.value)
    assert "not available (plugin may not be installed)" in text
    assert "fedavg (from fedplug" in text and "aggregator=<name>" in text


def _fake(monkeypatch, group_entries):
    real = plugins._entry_points

    def fake(group):
        return real(group) + group_entries.get(group, [])
    monkeypatch.setattr(plugins, "_entry_points", fake)


def test_two_packages_claiming_one_name_is_an_error_naming_both(monkeypatch):
    ep = metadata.EntryPoint("fedavg", "other_pkg.fedavg", "fedplug.aggregators")
    _fake(monkeypatch, {"fedplug.aggregators": [(ep, "fedplug-other", "9.9")]})
    with pytest.raises(PluginError) as info:
        load_plugin("aggregator", "fedavg")
    assert "fedplug-other 9.9" in str(info.value) and "fedplug 0.1.0" in str(info.value)


def test_a_broken_plugin_is_reported_with_its_traceback_only_when_selected(monkeypatch, tmp_path):
    (tmp_path / "broken_agg.py").write_text(textwrap.dedent("""
        import this_module_does_not_exist_anywhere
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = metadata.EntryPoint("broken", "broken_agg", "fedplug.aggregators")
    _fake(monkeypatch, {"fedplug.aggregators": [(ep, "fedplug-broken", "0.1")]})
    active = activate({"aggregator": "fedavg"}, observers=False)  # not selected: no error
    assert active.selected["aggregator"].name == "fedavg"
    with pytest.raises(PluginError) as info:
        load_plugin("aggregator", "broken")
    text = str(info.value)
    assert "failed to import" in text and "Traceback" in text
    assert "this_module_does_not_exist_anywhere" in text
    sys.modules.pop("broken_agg", None)


def test_unknown_role_is_an_error():
    with pytest.raises(PluginError, match="unknown plugin role"):
        plugins.discover("painter")
