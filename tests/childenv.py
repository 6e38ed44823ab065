"""Throw-away virtual environments that reuse this test run's installed packages, offline.

The tests that pip-install something (the example plugin, fedplug's own wheel)
must not touch the environment running the tests, and cannot download
anything.  ``venv --system-site-packages`` is not the answer: it exposes the
*base* interpreter's site-packages, which lacks torch (and fedplug) when the
user installed fedplug into a virtual environment, as the README's quick start
does.  Instead the child environment gets a ``.pth`` file naming the running
interpreter's own site-packages directories, whichever environment that is.

Two ways to see the parent, for the two kinds of test:

- ``editable=False`` (installing fedplug's own wheel): path lines in a ``.pth``
  file only extend ``sys.path``, and the ``.pth`` files *inside* those
  directories are not executed, so an editable install of fedplug in the
  parent (a ``.pth`` import hook) stays invisible and the child imports the
  wheel installed into it — while torch, pip and setuptools come from the parent;
- ``editable=True`` (installing a plugin on top of this fedplug): the parent's
  directories are added with ``site.addsitedir``, which runs their ``.pth``
  files, so the parent's fedplug is importable whether it is editable or not.

The child's own site-packages comes first on ``sys.path`` either way, so what is
installed into it shadows the parent's copy.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path


def parent_site_dirs() -> list[str]:
    """The running interpreter's site-packages directories (a venv's, or the base interpreter's)."""
    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()]
    seen: list[str] = []
    for d in dirs:
        if d not in seen and Path(d).is_dir():
            seen.append(d)
    return seen


class ChildEnv:
    """A virtual environment at ``root`` that sees the parent's packages after its own."""

    def __init__(self, root: Path, editable: bool = False):
        self.root = Path(root)
        venv.EnvBuilder(system_site_packages=False, with_pip=False, symlinks=os.name != "nt").create(self.root)
        self.python = self.root / "bin" / "python"
        own = subprocess.run([str(self.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
        self.site_packages = Path(own)
        dirs = parent_site_dirs()
        lines = [f"import site; site.addsitedir({d!r})" for d in dirs] if editable else dirs
        (self.site_packages / "_fedplug_test_parent.pth").write_text("\n".join(lines) + "\n")

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env["PIP_NO_INDEX"] = "1"  # offline by construction: nothing may come from the network
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        env.update(extra)
        return env

    def run(self, *args: str, cwd: Path, timeout: float = 300, check: bool = True,
            **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(self.python), *args], cwd=cwd, env=self.env(PYTHONUNBUFFERED="1", **env),
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def pip_install(self, target: str, cwd: Path) -> None:
        """Install ``target`` (a folder or a wheel) without dependencies, build isolation or network."""
        self.run("-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", target, cwd=cwd)


if __name__ == "__main__":  # a quick look: python tests/childenv.py /tmp/child
    child = ChildEnv(Path(sys.argv[1]))
    print(child.run("-c", "import sys; print('\\n'.join(sys.path))", cwd=Path.cwd()).stdout)
