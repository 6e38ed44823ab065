"""The observer contract: lifecycle hooks that must never break a run.

Subclass :class:`ObserverContract` and parametrize it with your observer's name::

    @pytest.mark.parametrize("observer_name", ["my_observer"])
    class TestMyObserver(ObserverContract):
        pass

The suite drives a simulated run through the observer exactly in the server's
order — ``run_start`` → ``client_joined`` → ``round_start`` → ``round_end`` →
``client_left`` → ``run_end`` — with a temporary run directory, rounds with and
without evaluation figures, and checks that nothing raises and that the weights
it is shown are left untouched.  After the run the ``observer_run_dir``
fixture's directory holds what the observer wrote, so a subclass can add its
own checks of those files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedplug import hooks
from fedplug.testing import checks
from fedplug.testing.data import clone_state, perturbed, sample_state_dict
from fedplug.testing.loading import plugin_manager
from fedplug.types import RoundRecord

OBSERVER_HOOKS = (
    "fedplug_run_start",
    "fedplug_client_joined",
    "fedplug_client_left",
    "fedplug_round_start",
    "fedplug_round_end",
    "fedplug_run_end",
)


def simulate_run(hook, run_dir: Path, config: dict, rounds: int = 2, clients=("client-0", "client-1")) -> list:
    """Call every observer hook with documented keyword arguments, in the server's order.

    Returns the ``(global_weights, previous_weights, snapshot)`` triples shown at
    each ``round_end`` so a caller can check they were not modified.
    """
    shown = []
    hook.fedplug_run_start(config=config, run_dir=run_dir)
    for c in clients:
        hook.fedplug_client_joined(client_id=c, info={"num_train": 10, "num_test": 4, "device": "cpu"})
    weights = sample_state_dict(0)
    records = []
    for r in range(1, rounds + 1):
        hook.fedplug_round_start(round_number=r, client_ids=list(clients))
        new = perturbed(weights, seed=r)
        evaluated = r % 2 == 0  # odd rounds carry no evaluation figures (None), as with eval_every=2
        record = RoundRecord(
            round_number=r,
            participants=tuple(clients),
            train_loss=1.0 / r,
            test_loss=0.9 / r if evaluated else None,
            map50=0.1 * r if evaluated else None,
            recall=0.2 * r if evaluated else None,
            seconds=0.5,
            # the server's shape: train_* for each accepted update, test_* for each evaluating client
            per_client={c: {"train_loss": 1.0 / r, "train_size": 10.0,
                            **({"test_loss": 0.9 / r, "map50": 0.1 * r, "recall": 0.2 * r, "test_size": 4.0}
                               if evaluated else {})}
                        for c in clients},
        )
        snapshot = (clone_state(new), clone_state(weights))
        hook.fedplug_round_end(record=record, global_weights=new, previous_weights=weights)
        shown.append((new, weights, snapshot))
        records.append(record)
        weights = new
    hook.fedplug_client_left(client_id=clients[-1], reason="disconnected")
    hook.fedplug_run_end(rounds=records, best_round=rounds, reason="completed")
    return shown


class ObserverContract:
    """Checks every observer must pass; see the module docstring for use."""

    @pytest.fixture
    def observer_name(self) -> str:
        pytest.fail(
            "parametrize the suite with your observer's name: "
            '@pytest.mark.parametrize("observer_name", ["<name>"])'
        )

    @pytest.fixture
    def observer_plugin(self) -> object | None:
        """``None``: load the observer by name from its entry point; else this object is the plugin."""
        return None

    @pytest.fixture
    def observer_run_config(self) -> dict[str, Any]:
        """What ``fedplug_run_start`` receives: the resolved run config as a plain dict."""
        return {
            "mode": "embedded",
            "run": {"num_clients": 2, "rounds": 2, "eval_every": 2, "seed": 0},
            "aggregator": {"name": "fedavg"},
            "model": {"name": "frcnn"},
            "resource_policy": {"name": "always"},
        }

    @pytest.fixture
    def observer_run_dir(self, fedplug_run_dir) -> Path:
        return fedplug_run_dir

    @pytest.fixture
    def observer_manager(self, observer_name: str, observer_plugin: object | None):
        return plugin_manager("observer", observer_name, observer_plugin)

    def test_implements_only_observer_hooks(self, observer_manager, observer_name):
        plugin = observer_manager.get_plugin(f"observer:{observer_name}")
        implemented = sorted(h.name for h in observer_manager.get_hookcallers(plugin) or [])
        assert implemented, f"observer {observer_name!r} implements no fedplug hook"
        role_hooks = sorted(set(implemented) - set(OBSERVER_HOOKS))
        assert not role_hooks, (
            f"observer {observer_name!r} implements role hooks {role_hooks}; every installed observer is "
            "registered, so it would answer for the selected plugin"
        )
        # Guard the suite itself: OBSERVER_HOOKS must list every non-firstresult spec.
        specs = {n for n in dir(hooks) if n.startswith("fedplug_")}
        assert set(OBSERVER_HOOKS) <= specs

    def test_simulated_run_does_not_raise(self, observer_manager, observer_run_dir, observer_run_config):
        simulate_run(observer_manager.hook, observer_run_dir, observer_run_config)

    def test_weights_shown_are_not_modified(self, observer_manager, observer_run_dir, observer_run_config):
        for new, previous, (new_before, previous_before) in simulate_run(
            observer_manager.hook, observer_run_dir, observer_run_config
        ):
            checks.assert_states_equal(new, new_before, "global_weights after fedplug_round_end")
            checks.assert_states_equal(previous, previous_before, "previous_weights after fedplug_round_end")

    def test_run_that_ends_before_any_round(self, observer_manager, observer_run_dir, observer_run_config):
        hook = observer_manager.hook
        hook.fedplug_run_start(config=observer_run_config, run_dir=observer_run_dir)
        hook.fedplug_client_joined(client_id="client-0", info={})
        hook.fedplug_client_left(client_id="client-0", reason="dropped")
        hook.fedplug_run_end(rounds=[], best_round=None, reason="error: not enough clients")

    def test_two_runs_in_one_process(self, observer_manager, tmp_path, observer_run_config):
        # The server may be embedded in a longer-lived process (tests, notebooks): a second run
        # must start clean in its own directory.
        first, second = tmp_path / "run-1", tmp_path / "run-2"
        first.mkdir()
        second.mkdir()
        simulate_run(observer_manager.hook, first, observer_run_config, rounds=1)
        simulate_run(observer_manager.hook, second, observer_run_config, rounds=2)
