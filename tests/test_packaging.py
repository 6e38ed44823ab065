"""The distribution: every package directory is listed, and a non-editable wheel works on its own."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from childenv import ChildEnv, parent_site_dirs

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
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(wheel_dir), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("fedplug-*.whl"))
    # torch and friends come from the environment running the tests; fedplug itself only from the wheel
    child = ChildEnv(tmp_path / "venv")
    child.pip_install(str(wheel), cwd=tmp_path)
    where = child.run("-c", "import fedplug, fedplug.conf, fedplug_plugins.detectors.frcnn as f;"
                      "print(fedplug.__file__); print(f.__file__)", cwd=tmp_path).stdout
    assert all(str(child.root) in line for line in where.split()), where
    listing = subprocess.run([str(child.root / "bin" / "fedplug"), "plugins"], check=True, capture_output=True,
                             text=True, cwd=tmp_path, env=child.env()).stdout
    for name in ("fedavg", "frcnn", "yolov3", "cpu_load"):
        assert name in listing
    job = child.run("-m", "fedplug", "--cfg", "job", "model=yolov3", "aggregator=fedprox", cwd=tmp_path).stdout
    assert "name: yolov3" in job and "name: fedprox" in job


def test_child_env_sees_this_environment_and_not_an_editable_fedplug(tmp_path):
    # The property both install tests rest on, checked cheaply: torch is importable in the child
    # (whether this run lives in a venv or the base interpreter), and fedplug is not, since an
    # editable install is an import hook the child never runs.
    child = ChildEnv(tmp_path / "venv")
    probe = child.run("-c", "import importlib.util as u; print(u.find_spec('torch') is not None, "
                      "u.find_spec('fedplug') is not None)", cwd=tmp_path).stdout.split()
    editable = "__editable__" in "".join(p.name for d in parent_site_dirs() for p in Path(d).glob("*.pth"))
    assert probe[0] == "True"
    if editable:
        assert probe[1] == "False", "an editable fedplug leaked into the child environment"
