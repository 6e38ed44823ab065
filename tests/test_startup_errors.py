"""Start-up failures are one line and a non-zero exit, before anything starts — never a traceback.

Each case runs ``python -m fedplug`` as a user would and checks the exit status
(2) and that the whole output is the one line saying what is wrong and how to
fix it, with no "Traceback" and no Hydra "Error executing job".

Permission cases need a process that permission bits stop: as root they run the
command as root with every capability dropped (setpriv), so the owner's bits
apply to it as to an ordinary user while the checkout and the interpreter stay
readable wherever they are (running as ``nobody`` failed in a fresh clone whose
folders nobody could not enter); elsewhere as the current user. Read-only file
systems are real ones (a tmpfs mounted read-only), skipped where mounting is
refused.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.faults

# root keeps its uid (so it can read the checkout) but loses CAP_DAC_OVERRIDE and the rest
NO_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]


def _fedplug(*args: str, cwd: Path, restricted: bool = False, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HOME=str(cwd), FEDPLUG_CACHE=str(cwd / "cache"))
    prefix = NO_CAPABILITIES if restricted else []
    return subprocess.run([*prefix, sys.executable, "-m", "fedplug", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 2, output
    assert "Traceback" not in output and "Error executing job" not in output, output
    assert len(output.splitlines()) == 1, output
    for word in words:
        assert word in output, output
    return output


def _restricted(tmp_path: Path) -> bool:
    """Whether the fedplug process must drop capabilities for permission bits to stop it (True as root)."""
    if os.geteuid() != 0:
        return False
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot stop this process")
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(mode=0o555)
    probe = subprocess.run([*NO_CAPABILITIES, sys.executable, "-c",
                            f"import os, fedplug.app; os.mkdir({str(probe_dir / 'x')!r})"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    if "PermissionError" not in probe.stderr:
        pytest.skip(f"dropping capabilities does not make permission bits apply here: {probe.stderr.strip()[-200:]}")
    return True


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only file system holding one existing run directory (tmpfs, remounted read-only)."""
    mount_point = tmp_path / "ro"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.stdout.strip()}")
    try:
        (mount_point / "old_run").mkdir()
        (mount_point / "old_run" / "app.log").write_text("an earlier run's log\n")
        remount = subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.strip()}")
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_port_in_use(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = _fedplug("mode=server", f"server.port={port}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _one_line(proc, f"cannot start: port {port} on 127.0.0.1 is already in use", "server.port=")
    assert not (tmp_path / "run" / "events.jsonl").exists()  # it stopped before the server was set up


def test_run_dir_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = _fedplug("mode=server", f"hydra.run.dir={tmp_path / 'afile' / 'run'}", cwd=tmp_path)
    _one_line(proc, f"the run directory {tmp_path / 'afile' / 'run'} cannot be created (Not a directory)",
              "hydra.run.dir=")


def test_multirun_sweep_dir_below_a_file(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = _fedplug("-m", "mode=plugins", f"hydra.sweep.dir={tmp_path / 'afile' / 'sweep'}", cwd=tmp_path)
    _one_line(proc, f"the sweep directory {tmp_path / 'afile' / 'sweep'} cannot be created (Not a directory)",
              "hydra.sweep.dir=")


def test_run_dir_without_permission(tmp_path):
    restricted = _restricted(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    proc = _fedplug("mode=server", f"hydra.run.dir={locked / 'run'}", cwd=tmp_path, restricted=restricted)
    _one_line(proc, f"the run directory {locked / 'run'} cannot be created (Permission denied)", "hydra.run.dir=")


def test_run_dir_on_a_read_only_file_system(tmp_path, read_only_dir):
    proc = _fedplug("mode=server", f"hydra.run.dir={read_only_dir / 'new_run'}", cwd=tmp_path)
    _one_line(proc, "cannot be created (Read-only file system)", "hydra.run.dir=")


def test_existing_run_dir_whose_log_cannot_be_opened(tmp_path, read_only_dir):
    proc = _fedplug("mode=server", f"hydra.run.dir={read_only_dir / 'old_run'}", cwd=tmp_path)
    _one_line(proc, f"cannot write {read_only_dir / 'old_run' / 'app.log'}", "(Read-only file system)")


def test_existing_run_dir_whose_log_is_not_a_file(tmp_path):
    (tmp_path / "run" / "app.log").mkdir(parents=True)
    proc = _fedplug("mode=server", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _one_line(proc, f"cannot write {tmp_path / 'run' / 'app.log'}", "(Is a directory)")


def test_existing_run_dir_whose_event_log_cannot_be_opened(tmp_path):
    (tmp_path / "run" / "events.jsonl").mkdir(parents=True)
    proc = _fedplug("mode=server", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    _one_line(proc, f"cannot write the run's files ({tmp_path / 'run' / 'events.jsonl'}: Is a directory)")


def test_unreadable_server_side_data(tmp_path):
    from fedplug.data.synthetic import generate_synthetic_federation

    restricted = _restricted(tmp_path)
    sites = tmp_path / "sites"
    generate_synthetic_federation(sites, num_clients=1, train_per_client=2, test_per_client=1, image_size=64, seed=0)
    os.chmod(sites, 0)  # the server reads data.root for the class names (mode=server) or to share it out
    try:
        proc = _fedplug("mode=server", "data=voc", f"data.root={sites}", f"hydra.run.dir={tmp_path / 'run'}",
                        cwd=tmp_path, restricted=restricted)
    finally:
        os.chmod(sites, 0o755)
    _one_line(proc, f"data error: cannot read {sites}", "Permission denied", "data.*")


def test_unreadable_previous_run(tmp_path):
    restricted = _restricted(tmp_path)
    previous = tmp_path / "previous"
    (previous / "checkpoints").mkdir(parents=True)
    (previous / "checkpoints" / "manifest.json").write_text("{}")
    os.chmod(previous / "checkpoints", 0)
    try:
        proc = _fedplug("mode=server", f"run.resume={previous}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
                        restricted=restricted)
    finally:
        os.chmod(previous / "checkpoints", 0o755)
    _one_line(proc, f"cannot start: run.resume={previous}: cannot read", "(Permission denied)")
