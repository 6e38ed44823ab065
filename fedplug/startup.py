"""Start-up failures as one line: the run directory, the log, the listening port, unreadable files.

Each check runs before anything else starts and, when it fails, prints one
line saying what is wrong and how to fix it, then exits with status 2 — not a
Hydra "Error executing job" traceback.

Who calls what: Hydra calls :class:`RunDirCheck` (``hydra.callbacks`` in
``conf/config.yaml``) once the config is composed and just before it creates
the run directory and opens its log there; ``fedplug.app.run_server`` calls
:func:`check_port` before loading data or building the model, and
:func:`describe_os_error` to word the errors it catches later.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

EXIT_STARTUP = 2  # the same status as a config error: nothing ran, fix the command or the machine


def describe_os_error(exc: OSError) -> str:
    """``"<file>: <reason>"`` for an OSError from the system, the message for one raised with text only."""
    if exc.errno is None or exc.strerror is None:
        return str(exc)
    return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _stop(line: str) -> None:
    print(line, flush=True)
    # SystemExit passes through Hydra's error reporting (it catches Exception), so no traceback is printed
    sys.exit(EXIT_STARTUP)


def check_run_dir(run_dir: Path, files: list[Path]) -> str | None:
    """Create ``run_dir`` and open each of ``files`` for appending, as Hydra is about to; the problem, or None."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return (f"cannot start: the run directory {run_dir} cannot be created ({_reason(exc)}); "
                "choose a writable place with hydra.run.dir=<dir>")
    if not run_dir.is_dir():
        return f"cannot start: the run directory {run_dir} is a file; choose another with hydra.run.dir=<dir>"
    for path in files:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            return (f"cannot start: cannot write {path} in the run directory {run_dir} ({_reason(exc)}); "
                    "make the directory writable, or choose another with hydra.run.dir=<dir>")
    return None


class RunDirCheck(Callback):
    """Hydra callback: the run directory and its log must be writable before Hydra (or fedplug) uses them."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf, open_dict, read_write

        # resolve hydra.run.dir exactly as Hydra's run_job will a moment later (${now:...} is cached)
        HydraConfig.instance().set_config(config)
        run_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir"))))
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(run_dir)
        # the files Hydra writes there next: the job's log, and .hydra/config.yaml (unless output_subdir=null)
        files = []
        log_file = OmegaConf.select(config, "hydra.job_logging.handlers.file.filename", default=None)
        if log_file:
            files.append(Path(str(log_file)))
        subdir = OmegaConf.select(config, "hydra.output_subdir", default=None)
        if subdir is not None:
            files.append(run_dir / str(subdir) / "config.yaml")
        problem = check_run_dir(run_dir, files)
        if problem:
            _stop(problem)

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        """``-m``: the sweep directory holds every job's run directory, so it must be creatable first."""
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        HydraConfig.instance().set_config(config)
        sweep_dir = Path(os.path.abspath(str(OmegaConf.select(config, "hydra.sweep.dir"))))
        problem = check_run_dir(sweep_dir, [sweep_dir / "multirun.yaml"])  # Hydra's first file there
        if problem:
            _stop(problem.replace("run directory", "sweep directory").replace("hydra.run.dir", "hydra.sweep.dir"))


def check_port(host: str, port: int) -> str | None:
    """Bind ``host:port`` for a moment, as the server will; the problem in one line, or None.

    Port 0 (any free port) cannot be busy.  The socket uses SO_REUSEADDR like
    aiohttp's, so a port held only by connections of a server that just died
    (TIME_WAIT, e.g. right before a ``run.resume``) counts as free.
    """
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot start: server.host={host} is not a name or address of this machine ({exc.strerror})"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            return listen_error(host, port, exc)
    return None


def listen_error(host: str, port: int, exc: OSError) -> str:
    """The one line for a failed listen on ``host:port``."""
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot start: port {port} on {host} is already in use (another fedplug server, or another "
                "program); stop it, or choose another port with server.port=<n> (0 picks a free one)")
    if exc.errno == errno.EACCES:
        return (f"cannot start: no permission to listen on port {port} (ports below 1024 need root); "
                "choose server.port=1024 or above")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot start: server.host={host} is not an address of this machine; use 0.0.0.0 (all "
                "interfaces), 127.0.0.1 or one of its own addresses")
    return f"cannot start: cannot listen on {host}:{port} ({describe_os_error(exc)}); check server.host/server.port"
