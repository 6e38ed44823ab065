"""How the contract suites get hold of a plugin: exactly as the core does.

A suite never imports a plugin module by name.  Given a name it goes through
:func:`fedplug.plugins.activate` (entry-point discovery, selection errors and
all) and calls hooks on the resulting pluggy manager; given an object (a plugin
under development, or a deliberately broken one in fedplug's meta-tests) it
registers that object on a fresh manager with the same hook specifications.
"""

from __future__ import annotations

import copy
import types
from importlib import metadata, resources
from typing import Any

import pluggy
import yaml

from fedplug import plugins

CONF_GROUP = "fedplug.conf"  # entry-point group whose values are packages holding Hydra configs


def plugin_manager(role: str, name: str, plugin: object | None = None) -> pluggy.PluginManager:
    """A plugin manager with the one plugin ``name`` registered for ``role``, observers off.

    With ``plugin=None`` the plugin is found through its entry point, as the core
    finds it.  Registration validates every ``@hookimpl`` against the specs
    (unknown hook names and unknown argument names are errors).
    """
    if plugin is None:
        if role == "observer":
            # activate() registers *every* observer; a suite checks one at a time.
            pm = plugins.new_manager()
            _, obj = plugins.load_plugin("observer", name)
            plugins.register_object(pm, "observer", name, obj)
            pm.check_pending()
            return pm
        return plugins.activate({role: name}, observers=False).pm
    pm = plugins.new_manager()
    plugins.register_object(pm, role, name, plugin)
    pm.check_pending()
    return pm


def plugin_identity(plugin: object | None) -> str | None:
    """A stable key for a plugin object (its module or class), for caching results per plugin."""
    if plugin is None:
        return None
    if isinstance(plugin, types.ModuleType):
        return plugin.__name__
    cls = type(plugin)
    return f"{cls.__module__}.{cls.__qualname__}"


def config_packages() -> list[str]:
    """Packages searched for config files: fedplug's own, then every ``fedplug.conf`` entry point."""
    found = ["fedplug.conf"]
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == CONF_GROUP and ep.value not in found:
                found.append(ep.value)
    return found


def default_config(role: str, name: str) -> dict[str, Any]:
    """The plugin's own config as the core would pass it, read from its config group file.

    Looks for ``<group>/<name>.yaml`` (``group`` is ``aggregator``, ``model`` or
    ``resource_policy``) in fedplug's configs and in every package declared in
    the ``fedplug.conf`` entry-point group.  Model files use ``# @package
    _global_`` with a ``model:`` node, which is what the detector receives.
    Falls back to ``{"name": name}`` when no file exists.  Interpolations
    (``${...}``) are not resolved: a suite subclass whose config relies on them
    overrides the ``*_config`` fixture.
    """
    group = plugins.CONFIG_GROUP_OF_ROLE.get(role)
    if group is None:
        return {"name": name}
    for package in config_packages():
        try:
            entry = resources.files(package) / group / f"{name}.yaml"
            if not entry.is_file():
                continue
            data = yaml.safe_load(entry.read_text(encoding="utf-8")) or {}
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError):
            continue
        if group == "model" and isinstance(data.get("model"), dict):
            data = data["model"]
        data = {k: v for k, v in data.items() if k != "defaults"}
        data.setdefault("name", name)
        return copy.deepcopy(data)
    return {"name": name}
