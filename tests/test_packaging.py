"""The distribution: every package directory is listed, and a non-editable wheel works on its own."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _package_dirs():
    mapping = {"fedplug": ROOT / "fedplug", "fedplug.conf": ROOT / "conf", "fedplug_plugins": ROOT / "plugins"}
    found = set()
    for prefix, top in mapping.items():
        for init in top.rglob("__init__.py"):
            rel = init.parent.relative_to(top)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join([prefix, *rel.parts]) if rel.parts else prefix)
    return found


def test_every_package_directory_is_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing = _package_dirs() - listed
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    wheel_dir = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("fedplug-*.whl"))
    venv = tmp_path / "venv"
    # reuse this machine's torch and friends; fedplug itself comes only from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import fedplug, fedplug.conf, fedplug_plugins.detectors.frcnn as f;"
                            "print(fedplug.__file__); print(f.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    assert all(str(venv) in line for line in where.split()), where
    listing = subprocess.run([str(venv / "bin" / "fedplug"), "plugins"], check=True, capture_output=True,
                             text=True, cwd=tmp_path, env=env).stdout
    for name in ("fedavg", "frcnn", "yolov3", "cpu_load"):
        assert name in listing
    job = subprocess.run([str(py), "-m", "fedplug", "--cfg", "job", "model=yolov3", "aggregator=fedprox"],
                         check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    assert "name: yolov3" in job and "name: fedprox" in job
