"""Finding, selecting and registering plugins.

Every plugin, built-in or third-party, is declared as an entry point in one
group per role.  The core never imports a plugin module by name: it reads the
entry points, imports only the plugin the config selects (so a broken plugin
that is not selected costs nothing), and registers it with pluggy.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable, Mapping

import pluggy

from fedplug import hooks

# role -> entry-point group.  The role name is also the Hydra config group,
# except for the detector, whose group is called ``model`` (``model=frcnn``).
ROLE_GROUPS: dict[str, str] = {
    "aggregator": "fedplug.aggregators",
    "detector": "fedplug.detectors",
    "resource_policy": "fedplug.resource_policies",
    "observer": "fedplug.observers",
}
CONFIG_GROUP_OF_ROLE = {"aggregator": "aggregator", "detector": "model", "resource_policy": "resource_policy"}


class PluginError(RuntimeError):
    """A plugin could not be selected: unknown, ambiguous or failing to import."""


@dataclass(frozen=True)
class PluginInfo:
    role: str
    name: str
    value: str  # "module:attr" the entry point points at
    package: str
    version: str

    def describe(self) -> str:
        return f"{self.name} (from {self.package} {self.version})"


def _entry_points(group: str) -> list[tuple[metadata.EntryPoint, str, str]]:
    found = []
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == group:
                found.append((ep, dist.metadata["Name"] or "?", dist.version or "?"))
    return found


def discover(role: str) -> dict[str, list[tuple[PluginInfo, metadata.EntryPoint]]]:
    """All installed plugins of a role, by name; a name may have several claimants."""
    if role not in ROLE_GROUPS:
        raise PluginError(f"unknown plugin role {role!r}; roles are: {', '.join(ROLE_GROUPS)}")
    by_name: dict[str, list[tuple[PluginInfo, metadata.EntryPoint]]] = {}
    seen: set[tuple[str, str, str]] = set()
    for ep, package, version in _entry_points(ROLE_GROUPS[role]):
        key = (ep.name, ep.value, package)
        if key in seen:  # the same distribution found twice on sys.path (e.g. editable + build dir)
            continue
        seen.add(key)
        info = PluginInfo(role, ep.name, ep.value, package, version)
        by_name.setdefault(ep.name, []).append((info, ep))
    return by_name


def list_plugins() -> list[PluginInfo]:
    """Every installed plugin of every role, sorted by role and name."""
    out = []
    for role in ROLE_GROUPS:
        for claimants in discover(role).values():
            out.extend(info for info, _ in claimants)
    return sorted(out, key=lambda i: (list(ROLE_GROUPS).index(i.role), i.name, i.package))


def _available(role: str, plugins: Mapping[str, list]) -> str:
    if not plugins:
        return "none are installed"
    return "available: " + ", ".join(
        claimants[0][0].describe() for _, claimants in sorted(plugins.items())
    )


def load_plugin(role: str, name: str) -> tuple[PluginInfo, object]:
    """Import the one plugin called ``name`` for ``role``, with a clear error if that fails."""
    plugins = discover(role)
    group = CONFIG_GROUP_OF_ROLE.get(role, role)
    if name not in plugins:
        raise PluginError(
            f"{role} {name!r} is not available (plugin may not be installed); "
            f"{_available(role, plugins)}. Install the package that provides it "
            f"(it must declare an entry point in group {ROLE_GROUPS[role]!r}) "
            f"or choose another with {group}=<name>."
        )
    claimants = plugins[name]
    if len(claimants) > 1:
        names = " and ".join(f"{i.package} {i.version} ({i.value})" for i, _ in claimants)
        raise PluginError(
            f"{role} {name!r} is claimed by more than one package: {names}. "
            "Uninstall one of them."
        )
    info, ep = claimants[0]
    try:
        obj = ep.load()
    except Exception:
        raise PluginError(
            f"{role} {name!r} from {info.package} {info.version} failed to import "
            f"({info.value}):\n{traceback.format_exc()}"
        ) from None
    return info, obj


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hooks.PROJECT)
    pm.add_hookspecs(hooks)
    return pm


@dataclass
class ActivePlugins:
    """The plugin manager with the selected plugins registered, and what was selected."""

    pm: pluggy.PluginManager
    selected: dict[str, PluginInfo]
    observers: list[PluginInfo]

    @property
    def hook(self):
        return self.pm.hook


def activate(
    selection: Mapping[str, str],
    *,
    observers: bool = True,
    disabled: Iterable[str] = (),
) -> ActivePlugins:
    """Register one plugin per role in ``selection`` (role -> name), plus observers.

    ``disabled`` names observers (``observer:name`` or just ``name``) not to load.
    """
    pm = new_manager()
    selected: dict[str, PluginInfo] = {}
    for role, name in selection.items():
        info, obj = load_plugin(role, name)
        pm.register(obj, name=f"{role}:{name}")
        selected[role] = info
    active_observers: list[PluginInfo] = []
    if observers:
        off = set(disabled)
        for name in sorted(discover("observer")):
            if name in off or f"observer:{name}" in off:
                continue
            info, obj = load_plugin("observer", name)
            pm.register(obj, name=f"observer:{name}")
            active_observers.append(info)
    pm.check_pending()
    return ActivePlugins(pm, selected, active_observers)


def register_object(pm: pluggy.PluginManager, role: str, name: str, obj: object) -> None:
    """Register an in-process plugin object (tests, notebooks) under a role."""
    pm.register(obj, name=f"{role}:{name}")
