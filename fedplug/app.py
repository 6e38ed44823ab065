"""The command line: ``python -m fedplug`` / ``fedplug``, a Hydra application.

``fedplug plugins`` lists installed plugins; everything else is composed by
Hydra from ``conf/`` (installed as ``fedplug.conf``) plus the config packages
that third-party plugins declare in the ``fedplug.conf`` entry-point group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

CONF_GROUP = "fedplug.conf"  # entry-point group: plugin packages holding Hydra config groups

log = logging.getLogger("fedplug")


def echo(text: str = "") -> None:
    print(text, flush=True)


def plugin_search_paths() -> list[str]:
    """``pkg://`` search-path entries for every installed plugin's config package, in search order.

    Hydra gets them from :class:`fedplug.searchpath.FedplugSearchPathPlugin`,
    never from the command line (see :func:`main`).
    """
    from fedplug.searchpath import plugin_search_paths as paths

    return paths()


def print_plugins() -> int:
    from fedplug.plugins import list_plugins

    rows = [("role", "name", "package", "version", "target")]
    rows += [(p.role, p.name, p.package, p.version, p.value) for p in list_plugins()]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def plugins_command(args: list[str]) -> int:
    """``fedplug plugins``: list installed plugins."""
    return print_plugins()


def _quiet_console() -> None:
    """Hydra logs to the console and to <run_dir>/<job>.log; keep the console for progress lines."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


def _threads(cfg: Any, local_clients: int) -> int:
    if int(cfg.client.torch_threads) > 0:
        return int(cfg.client.torch_threads)
    return max(1, (os.cpu_count() or 1) // max(1, local_clients))


def run(cfg: Any) -> int:
    """Dispatch on ``mode``; return the exit status."""
    from fedplug.config import ConfigError, validate
    from fedplug.plugins import PluginError

    try:
        validate(cfg)
    except ConfigError as exc:
        echo(f"config error: {exc}")
        return 2
    _quiet_console()
    mode = str(cfg.mode)
    try:
        if mode == "plugins":
            return print_plugins()
        if mode == "client":
            status = run_client(cfg)
            # A client has nothing left to do: skip the interpreter's teardown of torch and its
            # thread pools, which takes seconds on a loaded machine and would make the embedded
            # launcher wait for (or kill) clients that already finished cleanly.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return asyncio.run(run_server(cfg, embedded=(mode == "embedded")))
    except PluginError as exc:
        echo(f"plugin error: {exc}")
        return 2
    except KeyboardInterrupt:
        echo("interrupted")
        return 130


def run_client(cfg: Any) -> int:
    import torch

    from fedplug.client import FederationClient
    from omegaconf import OmegaConf

    torch.set_num_threads(_threads(cfg, 1))
    c = cfg.client
    spec = OmegaConf.to_container(c.data, resolve=True)
    augment = OmegaConf.to_container(c.augment, resolve=True) if c.augment is not None else None
    try:
        from fedplug.security import read_secret_file
        from fedplug.tls import client_context_from

        secret = read_secret_file(c.secret_file) if c.get("secret_file") else c.get("secret")
        ssl_context = client_context_from(c, str(c.server_url))  # None for http://; bad files: a clear error
        client = FederationClient(str(c.server_url), c.client_id, spec, device=str(c.device), token=c.token,
                                  augment=augment, reconnect_attempts=int(c.reconnect_attempts),
                                  max_message_mb=float(cfg.server.max_message_mb),
                                  reconnect_timeout_s=float(c.reconnect_timeout_s),
                                  reconnect_delay_max_s=float(c.reconnect_delay_max_s),
                                  call_timeout_s=float(c.call_timeout_s),
                                  protocol_version=int(c.protocol_version),
                                  parent_pid=int(c.parent_pid) if c.get("parent_pid") else None,
                                  secret=str(secret) if secret else None, ssl_context=ssl_context,
                                  client_cert=bool(c.get("ssl_certfile")))
    except ValueError as exc:
        echo(f"config error: {exc}")
        return 2
    echo(f"[{client.client_id}] connecting to {c.server_url}")
    return asyncio.run(client.run())


async def run_server(cfg: Any, embedded: bool) -> int:
    from fedplug.progress import TerminalView

    view = TerminalView(cfg)  # a live panel on a terminal, plain lines elsewhere, only problems with ui.quiet
    echo = view.echo
    from fedplug.startup import check_port, describe_os_error, listen_error

    busy = check_port(str(cfg.server.host), int(cfg.server.port))  # before seconds of data and model loading
    if busy:
        echo(busy)
        return 2
    from fedplug.launchers import launcher_name

    if embedded and launcher_name(cfg) == "ray":  # before seconds of data preparation
        from fedplug.launchers.ray import ray_missing

        if ray_missing():
            echo(ray_missing())
            return 2
    import torch
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from fedplug.data import class_names_of, prepare_federation
    from fedplug.data.errors import DatasetError
    from fedplug.launcher import ClientProcesses, client_command, hydra_literal
    from fedplug.plugins import activate
    from fedplug.server import FederationServer, RunFailed

    from fedplug.outputs import RunDirBusy, RunDirLock

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:  # held until this process ends (the kernel drops it even on SIGKILL)
        run_lock = RunDirLock(run_dir, Path(str(cfg.run.resume)) if cfg.run.resume else None)
    except RunDirBusy as exc:
        echo(f"cannot start: {exc}")
        return 2
    except OSError as exc:  # e.g. a read-only run directory: the lock file cannot be created
        echo(f"cannot start: cannot write in the run directory {run_dir} ({describe_os_error(exc)}); "
             "make it writable, or choose another with hydra.run.dir=<dir>")
        return 2
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2) if embedded else (os.cpu_count() or 1))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    try:
        shared_test = None
        if embedded:
            echo(f"preparing data ({data_cfg.get('name', data_cfg.get('format'))}) for "
                 f"{cfg.run.num_clients} clients ...")
            federation = prepare_federation(data_cfg, int(cfg.run.num_clients))
            class_names = tuple(federation.class_names)
            shared_test = getattr(federation, "shared_test", None)
            if federation.summary:
                echo(federation.summary)
        else:
            class_names = tuple(class_names_of(data_cfg))
        held_out, held_out_source = _held_out_set(cfg, shared_test, class_names)
    except (DatasetError, FileNotFoundError) as exc:
        echo(f"data error: {exc}")
        return 2
    except OSError as exc:  # a file or folder of the data that this user cannot read
        echo(f"data error: cannot read {describe_os_error(exc)}; check the data paths (data.*, eval.data) "
             "and that this user may read them")
        return 2

    plugins = activate(
        {"aggregator": str(cfg.aggregator.name), "detector": str(cfg.model.name),
         "resource_policy": str(cfg.resource_policy.name)},
        disabled=list(cfg.plugins.disable or []),
    )
    for role, info in plugins.selected.items():
        log.info("%s: %s", role, info.describe())
    try:
        server = FederationServer(cfg, plugins, class_names, run_dir, echo=echo, held_out=held_out,
                                  held_out_source=held_out_source, clients_have_test=shared_test is None)
    except (RunFailed, FileNotFoundError, ValueError) as exc:
        echo(f"cannot start: {exc}")
        return 2
    except OSError as exc:  # the run directory's files (event log, checkpoints) cannot be written
        echo(f"cannot start: cannot write the run's files ({describe_os_error(exc)}); fix that path, "
             "or choose another run directory with hydra.run.dir=<dir>")
        return 2
    try:
        server.outputs.write_config(OmegaConf.to_container(cfg, resolve=True))
    except OSError as exc:
        await server.stop()
        echo(f"cannot start: cannot write the run's files ({describe_os_error(exc)}); fix that path, "
             "or choose another run directory with hydra.run.dir=<dir>")
        return 2
    try:
        port = await server.start()
    except OSError as exc:  # the port was taken between check_port and now
        await server.stop()
        echo(listen_error(str(cfg.server.host), int(cfg.server.port), exc))
        return 2
    url = f"{server.url_scheme}://{cfg.server.host}:{port}"
    echo(f"fedplug server on {url}  model={cfg.model.name} ({server.num_parameters:,} parameters) "
         f"aggregator={cfg.aggregator.name} resource_policy={cfg.resource_policy.name}  classes={list(class_names)}")
    if server.held_out is not None:
        echo(f"evaluation: eval.on={server.eval_place}, the server scores {held_out_source} "
             f"({len(server.held_out)} images)")
    view.attach(server)
    clients = ClientProcesses()
    watcher = None
    died: dict[str, int] = {}  # local client processes that exited with an error while the run went on
    ray_clients = None
    if embedded and launcher_name(cfg) == "ray":  # the clients are Ray actors (fedplug/launchers/ray.py)
        from fedplug.launchers.ray import LaunchError, RayClients

        n = int(cfg.run.num_clients)
        names = list(getattr(federation, "client_names", None) or [f"client_{i + 1}" for i in range(n)])
        ray_clients = RayClients(cfg, dict(zip(names, federation.client_specs[:n])), run_dir, echo,
                                 data_cfg.get("augment"))
    try:
        if ray_clients is not None:
            try:
                await ray_clients.start(server, url)
            except LaunchError as exc:
                echo(f"cannot start: {exc}")
                return 2
        elif embedded:
            n = int(cfg.run.num_clients)
            threads = _threads(cfg, n)
            augment = data_cfg.get("augment")
            passthrough = [o for o in HydraConfig.get().overrides.hydra if o.startswith("hydra.searchpath")]
            # the local clients verify this server's certificate (and present theirs) as configured
            passthrough += [f"client.{key}={hydra_literal(str(cfg.client[key]))}"
                            for key in ("ca_file", "ssl_certfile", "ssl_keyfile") if cfg.client.get(key)]
            names = list(getattr(federation, "client_names", None) or [f"client_{i + 1}" for i in range(n)])
            commands = {
                names[i]: client_command(url, names[i], spec, run_dir, threads, augment,
                                         str(cfg.client.device), cfg.server.token, passthrough)
                for i, spec in enumerate(federation.client_specs[:n])
            }
            echo(f"starting {len(commands)} client processes (logs in {run_dir / 'clients'}) ...")
            clients.start(commands, run_dir / "clients")
            watcher = asyncio.get_running_loop().create_task(
                _watch_clients(server, clients, run_dir / "clients", int(cfg.run.min_clients), died))
        status = await server.run_federation()
    finally:
        if watcher is not None:
            watcher.cancel()
        view.close()
        await server.stop()
        run_lock.release()
        if ray_clients is not None:
            died.update(await ray_clients.stop())
        elif embedded:
            codes = clients.stop()
            bad = {cid: code for cid, code in codes.items() if code not in (0, None)}
            if bad:
                log.warning("client exit codes: %s", bad)
    if died and status == 0 and bool(cfg.run.get("fail_on_client_exit", True)):
        # the run finished, but without some sites' data: that is not the run the user asked for
        echo(f"client process(es) {', '.join(f'{c} (status {code})' for c, code in sorted(died.items()))} "
             "died during the run, so its results miss their data; exit status 1 "
             "(set run.fail_on_client_exit=false to accept such runs)")
        status = 1
    return status


def _held_out_set(cfg: Any, shared_test: dict | None, class_names: tuple[str, ...]):
    """The test set the server scores itself, and a description of it (``eval.data``, else a shared test set)."""
    from omegaconf import OmegaConf

    spec = cfg.eval.get("data")
    if spec is None and (shared_test is None or str(cfg.eval.get("on", "auto")) == "clients"):
        return None, ""
    from fedplug.data import open_eval_data

    if spec is not None:
        spec = OmegaConf.to_container(spec, resolve=True) if OmegaConf.is_config(spec) else spec
        if not isinstance(spec, dict):
            from fedplug.data.errors import DatasetError

            raise DatasetError(f"eval.data must be a dataset spec such as {{format: voc, path: /data/heldout}}, "
                               f"got {spec!r}")
        return open_eval_data(spec, class_names), f"eval.data ({spec.get('format')} at {spec.get('path')})"
    return open_eval_data(shared_test, class_names), f"the shared test set ({shared_test.get('path')})"


async def _watch_clients(server, clients, log_dir: Path, min_clients: int, reported: dict[str, int]) -> None:
    """Report local client processes that crash (into ``reported``); abort if too few are left to ever start a round."""
    while True:
        await asyncio.sleep(0.5)
        for cid, code in clients.exited_with_error().items():
            if cid in reported:
                continue
            reported[cid] = code
            echo(f"client process {cid} exited with status {code}; the end of its log:")
            echo("    " + clients.log_tail(cid, log_dir).replace("\n", "\n    "))
        if clients.alive() < min_clients and server.round_number == 0 and reported:
            server.abort(f"only {clients.alive()} local client process(es) are running, "
                         f"run.min_clients={min_clients}")
            return


def _hydra_entry() -> None:
    import hydra

    from fedplug import searchpath

    # Plugin config packages reach Hydra through a SearchPathPlugin, not through argv: an
    # appended hydra.searchpath=[...] would follow flags like --cfg job (and break them), and
    # would be replaced by a user's own hydra.searchpath, which now merges after them instead.
    searchpath.register()

    @hydra.main(version_base=None, config_path="pkg://fedplug.conf", config_name="config")
    def _main(cfg) -> None:
        from fedplug.plugins import PluginError, check_plugin_configs

        if str(cfg.get("mode")) != "plugins":
            from hydra.core.hydra_config import HydraConfig

            try:
                check_plugin_configs(cfg, dict(HydraConfig.get().runtime.choices))
            except PluginError as exc:
                echo(f"config error: {exc}")
                sys.exit(2)
        status = run(cfg)
        if status:
            sys.exit(status)

    _main()


def check_selected_plugins(args: list[str]) -> None:
    """Fail fast, before Hydra, when ``aggregator=x`` / ``model=x`` / ``resource_policy=x`` names no plugin.

    Hydra alone would only say that no config file is called ``x``; this says
    which plugins are installed, from which packages, and how to add one.
    """
    from fedplug.plugins import CONFIG_GROUP_OF_ROLE, PluginError, discover, load_plugin

    role_of_group = {group: role for role, group in CONFIG_GROUP_OF_ROLE.items()}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in role_of_group or not value or any(c in value for c in "()*[]"):
            continue  # sweep functions (choice(...), glob(*), ...) are Hydra's to expand
        for name in value.split(","):  # a multirun sweep: -m aggregator=fedavg,fedprox
            if name.strip() not in discover(role_of_group[key]):
                try:
                    load_plugin(role_of_group[key], name.strip())
                except PluginError as exc:
                    echo(f"plugin error: {exc}")
                    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``fedplug`` and ``python -m fedplug``."""
    args = list(sys.argv[1:] if argv is None else argv)
    from fedplug.cli import find

    command = find(args)
    if command is not None:
        sys.exit(command(args[1:]))
    check_selected_plugins(args)
    from fedplug.searchpath import startup_warnings

    for line in startup_warnings():  # e.g. a plugin's aggregator/fedavg.yaml shadowed by fedplug's own
        print(f"warning: {line}", file=sys.stderr, flush=True)
    sys.argv = [sys.argv[0]] + args
    _hydra_entry()
