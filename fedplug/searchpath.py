"""Where Hydra finds config groups: fedplug's ``conf/`` plus every plugin's config package.

A third-party package declares the Python package holding its Hydra config
groups in the ``fedplug.conf`` entry-point group::

    [project.entry-points."fedplug.conf"]
    fedplug_example = "fedplug_example.conf"

:class:`FedplugSearchPathPlugin` is a Hydra ``SearchPathPlugin`` that appends
``pkg://<package>`` for each of them after fedplug's own configs.  fedplug's
command line registers it (:func:`register`) before Hydra starts, so nothing is
added to the command line: ``--cfg job``, ``--info`` and the other Hydra flags
keep working, and a user's own ``hydra.searchpath=[...]`` is appended after
these entries instead of replacing them.  Code that composes configs itself
(``hydra.compose``) calls :func:`register` first, or passes
``hydra.searchpath`` explicitly.

Search order decides which file wins when two packages hold the same
``<group>/<name>.yaml``: fedplug's own first, then the plugin packages in the
order of :func:`config_packages`.  :func:`shadowed_configs` finds such
clashes; the command line warns about them at start-up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib import metadata, resources

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

CONF_GROUP = "fedplug.conf"  # entry-point group: packages holding Hydra config groups
OWN_PACKAGE = "fedplug.conf"
PROVIDER = "fedplug-plugins"  # the provider name Hydra shows in --info searchpath


@dataclass(frozen=True)
class ConfigPackage:
    """One package searched for config groups, and the distribution that declared it."""

    package: str  # importable package name, e.g. "fedplug_example.conf"
    distribution: str  # "fedplug" for fedplug's own configs
    entry_point: str  # the entry point's name ("" for fedplug's own)

    def describe(self) -> str:
        if self.distribution == "fedplug" and self.package == OWN_PACKAGE:
            return "fedplug's own configs (fedplug.conf)"
        return f"{self.package} (from package {self.distribution}, entry point {self.entry_point!r} " \
               f"in group {CONF_GROUP!r})"


def plugin_config_packages() -> list[ConfigPackage]:
    """Every ``fedplug.conf`` entry point, in a stable order (by distribution, then name), deduplicated."""
    found: dict[str, ConfigPackage] = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == CONF_GROUP and ep.value not in found and ep.value != OWN_PACKAGE:
                found[ep.value] = ConfigPackage(ep.value, dist.metadata["Name"] or "?", ep.name)
    return sorted(found.values(), key=lambda c: (c.distribution, c.entry_point, c.package))


def config_packages() -> list[ConfigPackage]:
    """fedplug's own config package first, then every plugin config package: Hydra's search order."""
    return [ConfigPackage(OWN_PACKAGE, "fedplug", ""), *plugin_config_packages()]


def plugin_search_paths() -> list[str]:
    """``pkg://`` search-path entries of the plugin config packages, in search order."""
    return [f"pkg://{c.package}" for c in plugin_config_packages()]


class FedplugSearchPathPlugin(SearchPathPlugin):
    """Appends ``pkg://<package>`` for every ``fedplug.conf`` entry point to Hydra's search path."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for path in plugin_search_paths():
            search_path.append(provider=PROVIDER, path=path)


def register() -> None:
    """Register :class:`FedplugSearchPathPlugin` with Hydra (idempotent); call before Hydra composes."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(FedplugSearchPathPlugin)


# ---------------------------------------------------------------------------
# Config files of the same group and name in two packages
# ---------------------------------------------------------------------------


def _yaml_files(package: str) -> dict[str, str]:
    """``group/name`` -> file location of every YAML file under ``package`` (recursively)."""
    out: dict[str, str] = {}
    root = resources.files(package)

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            if child.is_dir():
                if child.name != "__pycache__":
                    walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith((".yaml", ".yml")):
                out[f"{prefix}{child.name.rsplit('.', 1)[0]}"] = str(child)

    walk(root, "")
    return out


def unimportable_packages() -> list[tuple[ConfigPackage, str]]:
    """Plugin config packages that cannot be imported, with the reason."""
    bad = []
    for c in plugin_config_packages():
        try:
            importlib.import_module(c.package)
        except Exception as exc:  # noqa: BLE001 - any failure means Hydra cannot read it
            bad.append((c, f"{type(exc).__name__}: {exc}"))
    return bad


def shadowed_configs() -> list[tuple[str, ConfigPackage, list[ConfigPackage]]]:
    """``(group/name, the package whose file Hydra uses, the packages whose file is ignored)``.

    Only config groups count (a file inside a folder): the primary ``config.yaml``
    of fedplug is not a group option.
    """
    seen: dict[str, list[ConfigPackage]] = {}
    for c in config_packages():
        try:
            files = _yaml_files(c.package)
        except Exception:  # noqa: BLE001 - reported by unimportable_packages()
            continue
        for key in files:
            if "/" in key:
                seen.setdefault(key, []).append(c)
    return [(key, owners[0], owners[1:]) for key, owners in sorted(seen.items()) if len(owners) > 1]


def startup_warnings() -> list[str]:
    """Human-readable warnings about the config packages, for the command line to print."""
    lines = []
    for c, reason in unimportable_packages():
        lines.append(
            f"config package {c.describe()} cannot be imported ({reason}); its config groups are not "
            f"available. Reinstall {c.distribution} or fix its entry point in group {CONF_GROUP!r}."
        )
    for key, winner, losers in shadowed_configs():
        for loser in losers:
            group, _, name = key.rpartition("/")
            if winner.package == OWN_PACKAGE:
                fix = (f"fedplug's own {key}.yaml wins; {loser.distribution}'s file is never used. "
                       f"{loser.distribution} must rename its file (and its entry point) to a name fedplug "
                       f"does not use, e.g. {group}/{loser.distribution.replace('-', '_')}_{name}.yaml")
            else:
                fix = (f"the file from {winner.distribution} wins (it comes first in the search path); the one "
                       f"from {loser.distribution} is never used. Rename one of them, or uninstall one package "
                       f"(pip uninstall {loser.distribution})")
            lines.append(f"config {key}.yaml is provided by both {winner.describe()} and {loser.describe()}: {fix}.")
    return lines
