"""Finding, selecting and registering plugins.

Every plugin, built-in or third-party, is declared as an entry point in one
group per role.  The core never imports a plugin module by name: it reads the
entry points, imports only the plugin the config selects (so a broken plugin
that is not selected costs nothing), checks it against its role's hooks and
registers it with pluggy.

Every error raised here is a :class:`PluginError` whose message names the
plugin, the package that provides it and the hook concerned, and says what to do.
"""

from __future__ import annotations

import difflib
import inspect
import traceback
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterable, Mapping

import pluggy

from fedplug import hooks

# role -> entry-point group.  The role name is also the Hydra config group,
# except for the detector, whose group is called ``model`` (``model=frcnn``).
ROLE_GROUPS: dict[str, str] = {
    "aggregator": "fedplug.aggregators",
    "detector": "fedplug.detectors",
    "resource_policy": "fedplug.resource_policies",
    "codec": "fedplug.codecs",
    "observer": "fedplug.observers",
}
CONFIG_GROUP_OF_ROLE = {"aggregator": "aggregator", "detector": "model", "resource_policy": "resource_policy",
                        "codec": "codec"}

# The hooks each role must implement, and those it may implement (see fedplug/hooks.py).
REQUIRED_HOOKS: dict[str, tuple[str, ...]] = {
    "aggregator": ("fedplug_aggregate",),
    "detector": ("fedplug_build_model", "fedplug_train_round", "fedplug_evaluate"),
    "resource_policy": ("fedplug_measure_resources", "fedplug_select_clients"),
    "codec": ("fedplug_encode_update", "fedplug_decode_update"),
    "observer": (),
}
OPTIONAL_HOOKS: dict[str, tuple[str, ...]] = {
    "aggregator": ("fedplug_aggregator_round_settings", "fedplug_aggregator_privacy"),
    "detector": (),
    "resource_policy": (),
    "codec": (),
    "observer": (
        "fedplug_run_start", "fedplug_client_joined", "fedplug_client_left",
        "fedplug_round_start", "fedplug_round_end", "fedplug_run_end",
    ),
}
OBSERVER_HOOKS = OPTIONAL_HOOKS["observer"]
# update filters (fedplug/update_filter.py): chosen per round by the aggregator's settings, not by a config
# group, and loaded by clients only, so they stay out of the tables the config checks read
ROLE_GROUPS["update_filter"] = "fedplug.update_filters"
REQUIRED_HOOKS["update_filter"] = ("fedplug_filter_update",)
OPTIONAL_HOOKS["update_filter"] = ()
# role hook -> the role that owns it (firstresult hooks: one selected plugin answers).
ROLE_OF_HOOK: dict[str, str] = {
    hook: role for role in ("aggregator", "detector", "resource_policy", "codec")
    for hook in REQUIRED_HOOKS[role] + OPTIONAL_HOOKS[role]
}
ROLE_OF_HOOK["fedplug_filter_update"] = "update_filter"
HOOK_SPECS: tuple[str, ...] = tuple(
    sorted(name for name, obj in vars(hooks).items() if name.startswith("fedplug_") and inspect.isfunction(obj))
)
DECORATOR_HINT = "hook functions must be decorated with @fedplug.hooks.hookimpl (from fedplug.hooks import hookimpl)"


class PluginError(RuntimeError):
    """A plugin could not be selected: unknown, ambiguous, failing to import or breaking the hook contract."""


@dataclass(frozen=True)
class PluginInfo:
    role: str
    name: str
    value: str  # "module:attr" the entry point points at
    package: str
    version: str

    def describe(self) -> str:
        return f"{self.name} (from {self.package} {self.version})"

    def where(self) -> str:
        """The plugin, its package and its entry point, for error messages."""
        return (f"{self.role} {self.name!r} (package {self.package} {self.version}, entry point "
                f"{self.name} = {self.value!r} in group {ROLE_GROUPS.get(self.role, '?')!r})")


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


def _did_you_mean(word: str, *candidate_lists: Iterable[str], cutoff: float = 0.7) -> str:
    """`` Did you mean 'x'?`` for the closest candidate, trying each list in turn; else ``""``."""
    for candidates in candidate_lists:
        close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
        if close:
            return f" Did you mean {close[0]!r}?"
    return ""


def _clash_message(role: str, name: str, claimants: list[tuple[PluginInfo, Any]]) -> str:
    group = ROLE_GROUPS[role]
    names = " and ".join(f"{i.package} {i.version} ({i.value})" for i, _ in claimants)
    others = [i for i, _ in claimants if i.package != "fedplug"]
    head = f"{role} {name!r} is claimed by more than one package: {names}. "
    if len(others) < len(claimants):  # one claimant is fedplug itself: the others must give way
        pkgs = ", ".join(i.package for i in others)
        return head + (
            f"{name!r} is a built-in fedplug {role}, so {pkgs} must rename its entry point "
            f"(the key {name!r} under [project.entry-points.\"{group}\"] in its pyproject.toml) "
            f"or be uninstalled (pip uninstall {others[0].package})."
        )
    return head + (
        f"Rename the entry point {name!r} (under [project.entry-points.\"{group}\"]) in one of "
        + ", ".join(i.package for i in others)
        + ", or uninstall all but one of them (" + " / ".join(f"pip uninstall {i.package}" for i in others) + ")."
    )


def load_plugin(role: str, name: str) -> tuple[PluginInfo, object]:
    """Import the one plugin called ``name`` for ``role``, with a clear error if that fails."""
    plugins = discover(role)
    group = CONFIG_GROUP_OF_ROLE.get(role, role)
    if name not in plugins:
        raise PluginError(
            f"{role} {name!r} is not available (plugin may not be installed); "
            f"{_available(role, plugins)}.{_did_you_mean(name, plugins)} Install the package that provides it "
            f"(it must declare an entry point in group {ROLE_GROUPS[role]!r}) "
            f"or choose another with {group}=<name>."
        )
    claimants = plugins[name]
    if len(claimants) > 1:
        raise PluginError(_clash_message(role, name, claimants))
    info, ep = claimants[0]
    try:
        obj = ep.load()
    except Exception:
        fix = (f" Fix or uninstall {info.package} (pip uninstall {info.package}), or skip this observer with "
               f"plugins.disable=[{name}]." if role == "observer" else
               f" Fix or reinstall {info.package}, or choose another with {group}=<name>.")
        raise PluginError(
            f"{role} {name!r} from {info.package} {info.version} failed to import "
            f"(entry point {name} = {info.value!r} in group {ROLE_GROUPS[role]!r}).{fix}\n"
            f"{traceback.format_exc()}"
        ) from None
    return info, obj


# ---------------------------------------------------------------------------
# The hook contract of one plugin object, checked before it is registered
# ---------------------------------------------------------------------------


def _routine(obj: object, attr: str) -> bool:
    try:
        value = inspect.getattr_static(obj, attr)
    except AttributeError:
        return False
    if isinstance(value, (staticmethod, classmethod)):
        return True
    return inspect.isroutine(value)


def _hook_functions(pm: pluggy.PluginManager, obj: object) -> tuple[dict[str, str], list[str]]:
    """``(hook name -> attribute, for @hookimpl-marked functions; names of unmarked fedplug_* functions)``."""
    marked: dict[str, str] = {}
    unmarked: list[str] = []
    for attr in dir(obj):
        try:
            opts = pm.parse_hookimpl_opts(obj, attr)
        except Exception:  # noqa: BLE001 - an attribute pluggy cannot inspect is not a hook
            opts = None
        if opts is not None:
            marked[opts.get("specname") or attr] = attr
        elif attr.startswith("fedplug") and _routine(obj, attr):
            unmarked.append(attr)
    return marked, unmarked


def _parameters(obj: object, attr: str) -> list[str] | None:
    try:
        params = inspect.signature(getattr(obj, attr)).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return None
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def check_plugin(info: PluginInfo, obj: object, pm: pluggy.PluginManager | None = None) -> dict[str, str]:
    """Check ``obj`` against the hook contract of ``info.role``; return its hooks (name -> attribute).

    Raises :class:`PluginError` for a hook name fedplug does not have (with
    "did you mean"), a function named like a hook but not marked ``@hookimpl``,
    a required hook of the role that is missing, an argument the hook does not
    pass, and an observer implementing a role hook.
    """
    pm = pm or new_manager()
    role = info.role
    where = info.where()
    marked, unmarked = _hook_functions(pm, obj)
    disable = f" Or skip this observer with plugins.disable=[{info.name}]." if role == "observer" else ""

    unknown = sorted(h for h in marked if h not in HOOK_SPECS)
    if unknown:
        hook = unknown[0]
        own = REQUIRED_HOOKS[role] + OPTIONAL_HOOKS[role]
        raise PluginError(
            f"{where} implements {hook}, which is not a fedplug hook.{_did_you_mean(hook, own, HOOK_SPECS)} "
            f"Rename it to one of the hooks in fedplug/hooks.py ({', '.join(own)} "
            f"for a{'n' if role[0] in 'aeiou' else ''} {role}).{disable}"
        )

    undecorated = sorted(a for a in unmarked if a in HOOK_SPECS)
    if undecorated:
        hook = undecorated[0]
        raise PluginError(
            f"{where} has a function {hook} but it is not marked @hookimpl, so fedplug would never call it: "
            f"{DECORATOR_HINT}.{disable}"
        )

    if role == "observer":
        taken = sorted(h for h in marked if h in ROLE_OF_HOOK)
        if taken:
            hook = taken[0]
            owner = ROLE_OF_HOOK[hook]
            raise PluginError(
                f"{where} implements the {owner} hook {hook}: every installed observer is registered, so it "
                f"would answer {hook} instead of the selected {owner}. Observers may implement only "
                f"{', '.join(OBSERVER_HOOKS)}; move {hook} to a {owner} plugin (selected with "
                f"{CONFIG_GROUP_OF_ROLE[owner]}=<name>), or skip this observer with plugins.disable=[{info.name}]."
            )
        if not marked:
            near = [a for a in unmarked if difflib.get_close_matches(a, OBSERVER_HOOKS, n=1, cutoff=0.7)]
            hint = (f" It has {', '.join(near)}: rename to the hook's exact name "
                    f"({_did_you_mean(near[0], OBSERVER_HOOKS).strip()}) and mark it @hookimpl." if near else "")
            raise PluginError(
                f"{where} implements no fedplug hook, so it would never be called.{hint} Observer hooks are "
                f"{', '.join(OBSERVER_HOOKS)}; {DECORATOR_HINT}.{disable}"
            )
    else:
        for hook in REQUIRED_HOOKS[role]:
            if hook in marked:
                continue
            near = difflib.get_close_matches(hook, [a for a in unmarked if a not in HOOK_SPECS], n=1, cutoff=0.7)
            hint = (f" It has a function {near[0]}: did you mean {hook}? Rename it and mark it @hookimpl."
                    if near else "")
            raise PluginError(
                f"{where} does not implement {hook}, which every {role} must implement "
                f"({', '.join(REQUIRED_HOOKS[role])}).{hint} Name the function exactly like the hook; "
                f"{DECORATOR_HINT}."
            )

    for hook, attr in sorted(marked.items()):
        spec_args = list(inspect.signature(getattr(hooks, hook)).parameters)
        args = _parameters(obj, attr)
        if args is None:
            continue
        for arg in args:
            if arg not in spec_args:
                raise PluginError(
                    f"{where}: its {hook} takes an argument {arg!r} that the hook does not pass."
                    f"{_did_you_mean(arg, spec_args, cutoff=0.5)} {hook} is called with the keyword arguments "
                    f"{', '.join(spec_args)}; an implementation may accept any subset of them.{disable}"
                )
    return marked


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hooks.PROJECT)
    pm.add_hookspecs(hooks)
    return pm


def _register(pm: pluggy.PluginManager, info: PluginInfo, obj: object) -> None:
    check_plugin(info, obj, pm)
    try:
        pm.register(obj, name=f"{info.role}:{info.name}")
    except (pluggy.PluginValidationError, ValueError) as exc:
        raise PluginError(f"{info.where()} cannot be registered: {exc}") from None


@dataclass
class ActivePlugins:
    """The plugin manager with the selected plugins registered, and what was selected."""

    pm: pluggy.PluginManager
    selected: dict[str, PluginInfo]
    observers: list[PluginInfo]

    @property
    def hook(self):
        return self.pm.hook


def _check_disabled(disabled: Iterable[str], installed: Iterable[str]) -> set[str]:
    names = sorted(installed)
    off: set[str] = set()
    for entry in disabled:
        entry = str(entry)
        name = entry.split(":", 1)[1] if entry.startswith("observer:") else entry
        if name not in names:
            listing = ", ".join(names) if names else "none are installed"
            raise PluginError(
                f"plugins.disable names {entry!r}, which is not an installed observer "
                f"(installed observers: {listing}).{_did_you_mean(name, names)} plugins.disable lists "
                "observers only (\"name\" or \"observer:name\"); role plugins are switched by selecting "
                "another one, e.g. aggregator=<name>."
            )
        off.add(name)
    return off


def activate(
    selection: Mapping[str, str],
    *,
    observers: bool = True,
    disabled: Iterable[str] = (),
) -> ActivePlugins:
    """Register one plugin per role in ``selection`` (role -> name), plus observers.

    Each plugin is checked against its role's hooks first (:func:`check_plugin`).
    ``disabled`` names observers (``observer:name`` or just ``name``) not to
    load; a name that matches no installed observer is an error.
    """
    pm = new_manager()
    selected: dict[str, PluginInfo] = {}
    for role, name in selection.items():
        info, obj = load_plugin(role, name)
        _register(pm, info, obj)
        selected[role] = info
    active_observers: list[PluginInfo] = []
    if observers:
        installed = discover("observer")
        off = _check_disabled(disabled, installed)
        for name in sorted(installed):
            if name in off:
                continue
            info, obj = load_plugin("observer", name)
            _register(pm, info, obj)
            active_observers.append(info)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:  # unreachable after check_plugin(); kept as a backstop
        raise PluginError(f"a plugin implements an unknown hook: {exc}") from None
    return ActivePlugins(pm, selected, active_observers)


def register_object(pm: pluggy.PluginManager, role: str, name: str, obj: object, *, check: bool = False) -> None:
    """Register an in-process plugin object (tests, notebooks) under a role.

    With ``check=True`` the object is first checked like an installed plugin at
    :func:`activate` (:func:`check_plugin`); by default it is registered as it
    is, so a test may register a partial plugin (e.g. an observer of one hook).
    """
    if check:
        check_plugin(PluginInfo(role, name, f"<object {type(obj).__qualname__}>", "<in-process object>", "-"),
                     obj, pm)
    pm.register(obj, name=f"{role}:{name}")


# ---------------------------------------------------------------------------
# The selected plugins' config files
# ---------------------------------------------------------------------------


def _find_config_file(group: str, choice: str):
    """``(description, file)`` of the ``<group>/<choice>.yaml`` Hydra uses (first in the search path), or ``None``."""
    try:
        from importlib import resources

        from fedplug.searchpath import config_packages

        for c in config_packages():
            try:
                entry = resources.files(c.package) / group / f"{choice}.yaml"
                if entry.is_file():
                    return f"{group}/{choice}.yaml (in {c.describe()}: {entry})", entry
            except Exception:  # noqa: BLE001
                continue
    except Exception:  # noqa: BLE001
        pass
    return None


def _config_file(group: str, choice: str) -> str:
    """Where ``<group>/<choice>.yaml`` is found first in the search path, for messages."""
    found = _find_config_file(group, choice)
    return found[0] if found else f"{group}/{choice}.yaml"


def _name_in_file(group: str, choice: str) -> Any:
    """The ``name:`` written in the file itself (``model.name`` for a model file), or ``None``."""
    found = _find_config_file(group, choice)
    if found is None:
        return None
    try:
        import yaml

        data = yaml.safe_load(found[1].read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001
        return None
    if not isinstance(data, dict):
        return None
    if group == "model" and isinstance(data.get("model"), dict):
        data = data["model"]
    return data.get("name")


def check_plugin_configs(cfg: Any, choices: Mapping[str, Any]) -> None:
    """Recognise the config-file mistakes that would otherwise surface as a misleading error.

    ``cfg`` is the composed config, ``choices`` Hydra's ``group -> option``
    (``HydraConfig.get().runtime.choices``, or ``{"aggregator": "foo"}`` from a
    contract suite).  Raises :class:`PluginError` saying what is wrong in the file:

    * a model file without ``# @package _global_`` (its ``model:`` node lands at
      ``model.model``, and the run would say "model.name is missing");
    * an aggregator/resource-policy file *with* ``# @package _global_``;
    * a file whose ``name:`` is not the plugin's entry-point name, while the
      file's own name is (the run would say "not available ... install the package").
    """

    def get(node: Any, key: str) -> Any:
        try:
            return node[key] if node is not None and key in node else None
        except Exception:  # noqa: BLE001
            return None

    for role, group in CONFIG_GROUP_OF_ROLE.items():
        choice = choices.get(group)
        if choice is None:
            continue
        choice = str(choice)
        node = get(cfg, group)
        name = get(node, "name")
        where = _config_file(group, choice)
        if name is None:
            if group == "model" and get(get(node, "model"), "name") is not None:
                raise PluginError(
                    f"{where} does not start with '# @package _global_', so its model: node ended up at "
                    f"model.model (and its train: block, if any, at model.train) and model.name is missing. "
                    f"Put '# @package _global_' on the file's first line, as in fedplug's conf/model/frcnn.yaml."
                )
            if group != "model" and get(cfg, "name") is not None:
                raise PluginError(
                    f"{where} puts its keys at the top of the config (name: {get(cfg, 'name')!r} is at the top "
                    f"level, {group}.name is missing): remove '# @package _global_' from it; only model files "
                    f"use that header."
                )
            if group == "model" and node is not None and get(cfg, "name") is not None:
                raise PluginError(
                    f"{where} has '# @package _global_' but its keys are not under model:, so model.name is "
                    f"missing. Put the detector's settings under a model: node."
                )
            raise PluginError(
                f"{where} has no name: key, so fedplug cannot tell which {role} it configures. Add "
                f"{'model.' if group == 'model' else ''}name: <the plugin's entry-point name> to it."
            )
        if not isinstance(name, str):
            continue
        # Only the file's own name: counts: model.name=x on the command line is the user's choice,
        # and an unknown x gets the usual "not available" error.
        if name != choice and _name_in_file(group, choice) == name:
            installed = discover(role)
            if name not in installed and choice in installed:
                info = installed[choice][0][0]
                raise PluginError(
                    f"{where} sets {group}.name: {name!r}, but the {role} it belongs to is called {choice!r} "
                    f"(the entry point of {info.package} {info.version} in group {ROLE_GROUPS[role]!r}), and no "
                    f"{role} is called {name!r}. Set name: {choice} in that file: name: is the plugin's "
                    f"entry-point name."
                )
