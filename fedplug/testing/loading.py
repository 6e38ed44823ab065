"""How the contract suites get hold of a plugin and its config: exactly as the core does.

A suite never imports a plugin module by name.  Given a name it goes through
:func:`fedplug.plugins.activate` (entry-point discovery, selection errors and
the hook-contract checks of :func:`fedplug.plugins.check_plugin`) and calls
hooks on the resulting pluggy manager; given an object (a plugin under
development, or a deliberately broken one in fedplug's meta-tests) it checks
that object the same way and registers it on a fresh manager with the same hook
specifications.

A plugin's config is its ``<group>/<name>.yaml`` composed by Hydra into
fedplug's whole config, as a run composes it (:func:`composed_config`), so
interpolations such as ``${run.seed}`` are resolved and a file that would not
work in a run (no ``# @package _global_`` on a model file, a ``name:`` that is
not the plugin's) is caught by the plugin's own tests.
"""

from __future__ import annotations

import copy
import functools
import types
from importlib import resources
from typing import Any

import pluggy
import yaml

from fedplug import plugins
from fedplug import searchpath as _searchpath

CONF_GROUP = _searchpath.CONF_GROUP  # entry-point group whose values are packages holding Hydra configs


def plugin_manager(role: str, name: str, plugin: object | None = None) -> pluggy.PluginManager:
    """A plugin manager with the one plugin ``name`` registered for ``role``, observers off.

    With ``plugin=None`` the plugin is found through its entry point, as the core
    finds it.  Either way it is checked as :func:`fedplug.plugins.activate`
    checks it (required hooks present and marked ``@hookimpl``, no unknown hook
    or argument name, no role hook in an observer): a failure raises
    :class:`~fedplug.plugins.PluginError` with the message a run would print.
    """
    if plugin is None:
        if role == "observer":
            # activate() registers *every* observer; a suite checks one at a time.
            pm = plugins.new_manager()
            info, obj = plugins.load_plugin("observer", name)
            plugins.check_plugin(info, obj, pm)
            plugins.register_object(pm, "observer", name, obj)
            pm.check_pending()
            return pm
        return plugins.activate({role: name}, observers=False).pm
    pm = plugins.new_manager()
    plugins.register_object(pm, role, name, plugin, check=True)
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
    """Packages searched for config files, in Hydra's order: fedplug's own, then every ``fedplug.conf`` entry point."""
    return [c.package for c in _searchpath.config_packages()]


def config_file(role: str, name: str):
    """``(package, file)`` of the ``<group>/<name>.yaml`` a run would use for this plugin, or ``None``."""
    group = plugins.CONFIG_GROUP_OF_ROLE.get(role)
    if group is None:
        return None
    for package in config_packages():
        try:
            entry = resources.files(package) / group / f"{name}.yaml"
            if entry.is_file():
                return package, entry
        except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError, TypeError):
            continue
    return None


class ConfigFileError(AssertionError):
    """A plugin's config file would not work in a run; the message says what is wrong in the file."""


@functools.lru_cache(maxsize=256)
def _composed(role: str, name: str, packages: tuple[str, ...], overrides: tuple[str, ...]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from fedplug.config import ConfigError, validate

    group = plugins.CONFIG_GROUP_OF_ROLE[role]
    extra = [f"pkg://{p}" for p in packages[1:]]
    args = [f"{group}={name}", *overrides]
    if extra:
        args.append("hydra.searchpath=[" + ",".join(f"'{p}'" for p in extra) + "]")
    if GlobalHydra.instance().is_initialized():
        raise ConfigFileError("cannot compose the plugin's config: Hydra is already initialised in this process "
                              "(a test inside hydra.initialize()?); override the <role>_config fixture instead")
    try:
        with initialize_config_module(config_module="fedplug.conf", version_base=None):
            cfg = compose(config_name="config", overrides=args)
    except Exception as exc:  # noqa: BLE001 - Hydra's own message says which file and why
        raise ConfigFileError(f"{group}/{name}.yaml does not compose with fedplug's config: "
                              f"{type(exc).__name__}: {exc}") from None
    try:
        plugins.check_plugin_configs(cfg, {group: name})
    except plugins.PluginError as exc:
        raise ConfigFileError(str(exc)) from None
    node = cfg[group]
    if node.get("name") != name:
        raise ConfigFileError(
            f"{group}/{name}.yaml sets {group}.name: {node.get('name')!r}, but the plugin is called {name!r}: "
            f"a run selecting {group}={name} would load the plugin called {node.get('name')!r}. Set name: {name} "
            "in that file (name: is the plugin's entry-point name)."
        )
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001 - e.g. ${run.sed}
        raise ConfigFileError(f"{group}/{name}.yaml: an interpolation does not resolve against fedplug's "
                              f"config: {type(exc).__name__}: {exc}") from None
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ConfigFileError(f"with {group}={name} the run's config is invalid: {exc}") from None
    return resolved


def composed_config(role: str, name: str, overrides=()) -> dict[str, Any]:
    """The whole run config with ``<group>=<name>`` selected, composed by Hydra and resolved, as a dict.

    Uses fedplug's ``conf/`` plus every ``fedplug.conf`` package, exactly as the
    command line does.  Raises :class:`ConfigFileError` (an ``AssertionError``)
    saying what is wrong when the file does not compose, is not a valid plugin
    config file (see :func:`fedplug.plugins.check_plugin_configs`), its
    ``name:`` is not ``name``, an interpolation does not resolve, or the run
    config it produces fails fedplug's start-up checks.
    """
    if role not in plugins.CONFIG_GROUP_OF_ROLE:
        raise ValueError(f"{role} plugins have no config group")
    return copy.deepcopy(_composed(role, name, tuple(config_packages()), tuple(overrides)))


def plugin_config(role: str, name: str) -> dict[str, Any]:
    """The plugin's own node (``aggregator``, ``model`` or ``resource_policy``) of :func:`composed_config`."""
    return composed_config(role, name)[plugins.CONFIG_GROUP_OF_ROLE[role]]


def check_config_file(role: str, name: str) -> None:
    """The contract suites' check of a plugin's config file; skips when the plugin has none."""
    import pytest

    found = config_file(role, name)
    group = plugins.CONFIG_GROUP_OF_ROLE.get(role, role)
    if found is None:
        pytest.skip(f"no {group}/{name}.yaml in fedplug's configs or any fedplug.conf package "
                    f"({', '.join(config_packages())}); without one, {group}={name} cannot be selected")
    plugin_config(role, name)  # raises ConfigFileError with the reason


def default_config(role: str, name: str) -> dict[str, Any]:
    """The plugin's own config as the core would pass it, from its config group file.

    The file ``<group>/<name>.yaml`` (``group`` is ``aggregator``, ``model`` or
    ``resource_policy``) is looked up in fedplug's configs and in every package
    declared in the ``fedplug.conf`` entry-point group, and composed into
    fedplug's config by Hydra, so interpolations (``${run.seed}``) are resolved
    (:func:`plugin_config`).  Model files use ``# @package _global_`` with a
    ``model:`` node, which is what the detector receives.  When the file does
    not compose, this falls back to the file's raw contents (interpolations
    unresolved; the suites' ``test_config_file_composes`` says what is wrong),
    and to ``{"name": name}`` when no file exists.
    """
    found = config_file(role, name)
    if found is None:
        return {"name": name}
    try:
        return plugin_config(role, name)
    except Exception:  # noqa: BLE001 - reported by test_config_file_composes
        pass
    group = plugins.CONFIG_GROUP_OF_ROLE[role]
    try:
        data = yaml.safe_load(found[1].read_text(encoding="utf-8")) or {}
    except Exception:  # noqa: BLE001
        return {"name": name}
    if not isinstance(data, dict):
        return {"name": name}
    if group == "model" and isinstance(data.get("model"), dict):
        data = data["model"]
    data = {k: v for k, v in data.items() if k != "defaults"}
    data.setdefault("name", name)
    return copy.deepcopy(data)
