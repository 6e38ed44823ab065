"""How ``mode=embedded`` starts its clients: the ``launcher`` config group (``conf/launcher/``).

- ``launcher=local`` (the default): one ``python -m fedplug mode=client`` process per
  client on this machine, all alive for the whole run (:mod:`fedplug.launcher`).
- ``launcher=ray``: each client is a Ray actor running :class:`fedplug.client.FederationClient`,
  started in waves when the cluster cannot hold every client at once
  (:mod:`fedplug.launchers.ray`, docs/scaling.md).

:func:`check_launcher_config` is called by :func:`fedplug.config.validate` at start-up,
before anything is started, so a wrong ``launcher.*`` value is one line naming the key.
"""

from __future__ import annotations

from typing import Any, Mapping

LAUNCHERS = ("local", "ray")


def launcher_name(cfg: Any) -> str:
    """``launcher.name``; ``local`` for a config composed without the launcher group."""
    node = cfg.get("launcher") if hasattr(cfg, "get") else None
    return str(node.get("name", "local")) if node is not None else "local"


def check_launcher_config(cfg: Any) -> None:
    """Raise :class:`fedplug.config.ConfigError` for the first ``launcher.*`` value that cannot work."""
    from fedplug.config import ConfigError

    name = launcher_name(cfg)
    if name not in LAUNCHERS:
        raise ConfigError(f"launcher.name must be one of {', '.join(LAUNCHERS)}, got {name!r} "
                          "(choose the group with launcher=local or launcher=ray)")
    if name != "ray":
        return
    node = cfg.launcher

    def number(key: str, low: float, *, allow_null: bool = False, integer: bool = False, open_low: bool = False):
        value = node.get(key)
        if value is None and allow_null:
            return None
        kind = int if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or (value <= low if open_low else value < low):
            what = "an integer" if integer else "a number"
            raise ConfigError(f"launcher.{key} must be {what} {'>' if open_low else '>='} {low:g}"
                              f"{' or null' if allow_null else ''}, got {value!r}")
        return value

    resources = node.get("client_resources")
    if not isinstance(resources, Mapping) and not hasattr(resources, "items"):
        raise ConfigError(f"launcher.client_resources must be a mapping such as {{num_cpus: 1, num_gpus: 0}}, "
                          f"got {resources!r}")
    for key, value in resources.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"launcher.client_resources.{key} must be a number >= 0 (fractions allowed), "
                              f"got {value!r}")
    number("max_alive", 1, allow_null=True, integer=True)
    number("max_restarts", 0, integer=True)
    number("num_cpus", 0, allow_null=True, open_low=True)
    number("num_gpus", 0, allow_null=True)
    number("object_store_mb", 75)  # Ray refuses a smaller object store
    clients, known = cfg.run.num_clients, cfg.server.get("max_clients")
    if known is not None and int(known) < int(clients):
        # in waves the server sees every client over the run, not only those alive at once
        raise ConfigError(f"server.max_clients ({known}) is below run.num_clients ({clients}): with launcher=ray the "
                          "server meets every client over the run; raise server.max_clients")
    address = node.get("address")
    if address is not None and (not isinstance(address, str) or not address.strip()):
        raise ConfigError(f"launcher.address must be null (a local cluster), auto, or an address such as "
                          f"ray://head:10001, got {address!r}")
