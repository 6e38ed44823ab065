"""The third-party example plugin, installed with pip, selected from the command line.

``examples/fedplug-example-plugin`` is copied to a temporary directory (so the
build leaves nothing in the source tree) and pip-installed, offline, into a
throw-away virtual environment that sees fedplug and torch from the environment
running the tests (a venv or the base interpreter: see ``childenv.py``), while
that environment itself is never modified.  Then, exactly as a user would: ``fedplug plugins`` lists it,
its own contract tests pass, a tiny federation selects its aggregator with a
parameter override and its observer writes ``model_drift.csv``, disabling the
observer from config works, and after ``pip uninstall`` it is gone.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from childenv import ChildEnv

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fedplug-example-plugin"
DIST = "fedplug-example-plugin"
# A federation small enough for a test: 2 clients, few tiny images, 1 local epoch, no load check.
TINY = [
    "run.num_clients=2", "run.min_clients=2", "run.clients_per_round=2",
    "data.train_per_client=8", "data.test_per_client=4", "train.local_epochs=1", "resource_policy=always",
]


class Env(ChildEnv):
    """The child environment, with the example installed from a copy of its source at ``source``."""

    def __init__(self, root: Path, source: Path):
        super().__init__(root, editable=True)  # the plugin installs on top of the fedplug under test
        self.source = source

    def run(self, *args: str, cwd: Path, timeout: float = 300, check: bool = True, **env: str):
        return super().run(*args, cwd=cwd, timeout=timeout, check=check,
                           FEDPLUG_CACHE=str(self.root.parent / "cache"), **env)


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory) -> Env:
    base = tmp_path_factory.mktemp("example-plugin")
    source = base / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    env = Env(base / "venv", source)
    env.pip_install(str(source), cwd=base)
    return env


def _plugins_listing(env: Env) -> str:
    return env.run("-m", "fedplug", "plugins", cwd=env.root.parent).stdout


def test_main_environment_is_untouched(plugin_env):
    # Installed into the venv only: this interpreter must not see the distribution.
    from importlib import metadata

    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution(DIST)


def test_fedplug_plugins_lists_it(plugin_env):
    rows = [line.split() for line in _plugins_listing(plugin_env).splitlines()]
    assert ["aggregator", "fedavg_clipped", DIST, "0.1.0", "fedplug_example.clipped"] in rows
    assert ["observer", "model_drift", DIST, "0.1.0", "fedplug_example.drift"] in rows


def test_hydra_flags_after_its_overrides_work(plugin_env, tmp_path):
    # with a plugin config package installed, --cfg job after the overrides is still Hydra's flag
    job = plugin_env.run("-m", "fedplug", "aggregator=fedavg_clipped", "--cfg", "job", cwd=tmp_path).stdout
    assert "name: fedavg_clipped" in job and "max_norm" in job


def test_its_own_contract_tests_pass(plugin_env):
    # Run from outside the source copy, so the tests import the *installed* package.
    proc = plugin_env.run(
        "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(plugin_env.source),
        str(plugin_env.source / "tests"), cwd=plugin_env.root.parent, timeout=400,
    )
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_tiny_federation_selects_it_from_the_command_line(plugin_env, tmp_path):
    run_dir = tmp_path / "run"
    max_norm = 0.05  # far below a round's update norms, so every update is clipped
    proc = plugin_env.run(
        "-m", "fedplug", "aggregator=fedavg_clipped", f"aggregator.max_norm={max_norm}", "run.rounds=2",
        *TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=420,
    )
    assert "aggregator=fedavg_clipped" in proc.stdout
    rounds = _read(run_dir / "model_drift.csv")
    assert [int(r["round"]) for r in rounds] == [1, 2], rounds
    for r in rounds:
        assert int(r["participants"]) == 2
        # The override reached the plugin: every update clipped, the model moved at most max_norm.
        assert int(r["clients_clipped"]) == 2
        assert 0 < float(r["l2_change"]) <= max_norm * (1 + 1e-4)
        assert float(r["max_client_delta"]) > max_norm
    clients = _read(run_dir / "model_drift_clients.csv")
    assert len(clients) == 2 * 2 and all(float(c["clip_factor"]) < 1 for c in clients)
    metrics = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(metrics) == 1 + 2


def test_observer_disabled_from_config(plugin_env, tmp_path):
    run_dir = tmp_path / "run"
    one_client = ["run.num_clients=1", "run.min_clients=1", "run.clients_per_round=1"]
    plugin_env.run(
        "-m", "fedplug", "plugins.disable=[model_drift]", "run.rounds=1", *TINY, *one_client,
        f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=420,
    )
    assert (run_dir / "metrics.csv").exists()
    assert not (run_dir / "model_drift.csv").exists()


def test_uninstalled_it_is_gone(plugin_env, tmp_path):
    plugin_env.run("-m", "pip", "uninstall", "-y", "-q", DIST, cwd=tmp_path)
    listing = _plugins_listing(plugin_env)
    assert "fedavg_clipped" not in listing and "model_drift" not in listing
    proc = plugin_env.run("-m", "fedplug", "aggregator=fedavg_clipped", cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "'fedavg_clipped' is not available" in proc.stdout + proc.stderr
