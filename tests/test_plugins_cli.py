"""Plugin config packages on the command line: Hydra's search path, shadowed files, wrong files.

Nothing is installed: each test writes a tiny fake distribution (a ``*.dist-info``
folder with ``entry_points.txt``) and its packages into a temporary folder and
runs ``python -m fedplug`` with ``PYTHONPATH`` pointing at it, so
``importlib.metadata`` finds it exactly as it finds a pip-installed plugin.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

AGGREGATOR = textwrap.dedent('''
    from fedplug.hooks import hookimpl

    @hookimpl
    def fedplug_aggregate(global_weights, updates):
        return global_weights
''')


def make_dist(root: Path, files: dict[str, str], entry_points: dict[str, dict[str, str]],
              name: str = "fakeplug") -> Path:
    """A fake installed distribution ``name`` 0.1 with ``files`` (path -> text) and entry points."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        # every folder on the way is a package, as a real config package must be
        for parent in path.relative_to(root).parents:
            if str(parent) != ".":
                (root / parent / "__init__.py").touch()
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in entry_points.items()
    ))
    return root


def fedplug(*args: str, path: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(path), HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "fedplug", *args], cwd=path, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def foo_plugin(tmp_path) -> Path:
    """A distribution with an aggregator ``foo`` and its config package (aggregator/foo.yaml)."""
    return make_dist(tmp_path / "site", {
        "fakeplug_pkg/foo.py": AGGREGATOR,
        "fakeplug_pkg/conf/aggregator/foo.yaml": "name: foo\nstrength: 3\n",
        # a user's own config folder, outside any plugin, to pass with hydra.searchpath
        "user_conf/data/mydata.yaml": "name: mydata\nformat: synthetic\n",
    }, {"fedplug.conf": {"fakeplug": "fakeplug_pkg.conf"}, "fedplug.aggregators": {"foo": "fakeplug_pkg.foo"}})


def test_hydra_flags_work_with_a_plugin_config_package_installed(foo_plugin):
    # main() used to append hydra.searchpath=[...] after the user's --cfg job: "unrecognized arguments".
    run = fedplug("model=frcnn", "--cfg", "job", path=foo_plugin)
    assert run.returncode == 0, run.stderr
    assert "unrecognized arguments" not in run.stderr
    assert "name: frcnn" in run.stdout


def test_plugin_config_group_composes(foo_plugin):
    run = fedplug("aggregator=foo", "aggregator.strength=5", "--cfg", "job", path=foo_plugin)
    assert run.returncode == 0, run.stderr
    assert "name: foo" in run.stdout and "strength: 5" in run.stdout


def test_plugin_package_is_in_hydras_search_path(foo_plugin):
    run = fedplug("--info", "searchpath", path=foo_plugin)
    assert run.returncode == 0, run.stderr
    assert "pkg://fakeplug_pkg.conf" in run.stdout


def test_users_own_searchpath_keeps_the_plugins_groups(foo_plugin):
    # A user's hydra.searchpath used to replace the plugins' entries: aggregator=foo no longer composed.
    run = fedplug("hydra.searchpath=[pkg://user_conf]", "aggregator=foo", "data=mydata", "--cfg", "job",
                  path=foo_plugin)
    assert run.returncode == 0, run.stderr
    assert "name: foo" in run.stdout and "name: mydata" in run.stdout


def test_the_users_searchpath_is_what_embedded_clients_are_passed(foo_plugin):
    # run_server passes the hydra.searchpath overrides on to client processes: that must be the
    # user's own override, never an entry fedplug made up (clients find plugins themselves).
    run = fedplug("hydra.searchpath=[pkg://user_conf]", "--cfg", "hydra", path=foo_plugin)
    assert run.returncode == 0, run.stderr
    hydra_overrides = run.stdout.split("overrides:", 1)[1].split("task:", 1)[0]
    assert "hydra.searchpath=[pkg://user_conf]" in hydra_overrides
    assert "fakeplug_pkg" not in hydra_overrides


def test_a_plugin_file_shadowed_by_fedplugs_own_is_reported(tmp_path):
    site = make_dist(tmp_path / "site", {
        "shadow_pkg/conf/aggregator/fedavg.yaml": "name: fedavg\nlr: 2\n",
    }, {"fedplug.conf": {"shadow": "shadow_pkg.conf"}}, name="shadowplug")
    run = fedplug("--cfg", "job", path=site)
    assert run.returncode == 0, run.stderr
    warning = run.stderr
    assert "aggregator/fedavg.yaml" in warning and "shadowplug" in warning, warning
    assert "fedplug's own aggregator/fedavg.yaml wins" in warning
    assert "must rename" in warning


def test_an_unimportable_config_package_is_reported(tmp_path):
    site = make_dist(tmp_path / "site", {"nothing/readme.txt": "x"},
                     {"fedplug.conf": {"ghost": "ghost_pkg.conf"}}, name="ghostplug")
    run = fedplug("--cfg", "job", path=site)
    assert run.returncode == 0, run.stderr
    assert "ghost_pkg.conf" in run.stderr and "ghostplug" in run.stderr and "cannot be imported" in run.stderr


def test_model_file_without_package_global_says_what_is_wrong(tmp_path):
    site = make_dist(tmp_path / "site", {
        "detpkg/det.py": "",
        "detpkg/conf/model/nog.yaml": "model:\n  name: nog\n  seed: ${run.seed}\n",
    }, {"fedplug.conf": {"detpkg": "detpkg.conf"}, "fedplug.detectors": {"nog": "detpkg.det"}}, name="detplug")
    run = fedplug("model=nog", "mode=server", path=site)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "model.name is missing" not in run.stdout.replace("and model.name is missing", "")
    assert "model/nog.yaml" in run.stdout and "# @package _global_" in run.stdout, run.stdout


def test_file_whose_name_differs_from_the_entry_point_says_what_is_wrong(tmp_path):
    site = make_dist(tmp_path / "site", {
        "fakeplug_pkg/foo.py": AGGREGATOR,
        "fakeplug_pkg/conf/aggregator/foo.yaml": "name: foo_aggregator\n",
    }, {"fedplug.conf": {"fakeplug": "fakeplug_pkg.conf"}, "fedplug.aggregators": {"foo": "fakeplug_pkg.foo"}})
    run = fedplug("aggregator=foo", "mode=server", path=site)
    assert run.returncode == 2, run.stdout + run.stderr
    out = run.stdout
    assert "aggregator/foo.yaml" in out and "'foo_aggregator'" in out and "Set name: foo" in out, out
    assert "install the package" not in out.lower()


def test_name_overridden_on_the_command_line_is_not_blamed_on_the_file(foo_plugin):
    run = fedplug("aggregator=foo", "aggregator.name=nosuchaggregator", "mode=server", path=foo_plugin)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Set name:" not in run.stdout
    assert "aggregator 'nosuchaggregator' is not available" in run.stdout, run.stdout
