"""The aggregator contract: what the server relies on from ``fedplug_aggregate``.

Subclass :class:`AggregatorContract` in your plugin's tests and parametrize it
with your plugin's entry-point name::

    import pytest
    from fedplug.testing import AggregatorContract

    pytest_plugins = ["fedplug.testing.plugin"]

    @pytest.mark.parametrize("aggregator_name", ["my_agg"])
    class TestMyAggregator(AggregatorContract):
        pass

The plugin is loaded through its entry point and called through a pluggy
manager exactly as the server does.  Override the ``aggregator_config`` fixture
to test other settings (default: your ``aggregator/<name>.yaml``), or
``aggregator_plugin`` to test an object that is not installed.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, ClassVar, Iterable, Iterator

import pytest
import torch

from fedplug.testing import checks
from fedplug.testing.data import CountingStream, clone_state, clone_updates, make_update
from fedplug.testing.loading import check_config_file, default_config, plugin_manager
from fedplug.types import ClientUpdate, EmptyRoundError, StateDict


def _lazy_stream(updates: list[ClientUpdate], delay_s: float = 0.01) -> Iterator[ClientUpdate]:
    """Yield updates as a producer thread delivers them, the way the server's stream does."""
    q: queue.Queue = queue.Queue()
    done = object()

    def produce() -> None:
        for u in updates:
            time.sleep(delay_s)
            q.put(u)
        q.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = q.get(timeout=30)
        if item is done:
            return
        yield item


class AggregatorContract:
    """Checks every aggregator must pass; see the module docstring for use.

    ``consensus_is_fixed_point``: when every client returns the same weights,
    the result is those weights (true of averaging and robust aggregators).
    Server optimisers (FedAdam, FedYogi, FedAdagrad...) that take their own step
    set it to ``False``; the suite then checks instead that the result moves from
    the global weights towards the clients' common value, element by element.
    """

    consensus_is_fixed_point: ClassVar[bool] = True

    # -- fixtures a subclass provides or overrides -------------------------

    @pytest.fixture
    def aggregator_name(self) -> str:
        pytest.fail(
            "parametrize the suite with your plugin's name: "
            '@pytest.mark.parametrize("aggregator_name", ["<name>"])'
        )

    @pytest.fixture
    def aggregator_plugin(self) -> object | None:
        """``None``: load the plugin by name from its entry point; else this object is the plugin."""
        return None

    @pytest.fixture
    def aggregator_config(self, aggregator_name: str) -> dict[str, Any]:
        return default_config("aggregator", aggregator_name)

    @pytest.fixture
    def aggregator_hook(self, aggregator_name: str, aggregator_plugin: object | None):
        return plugin_manager("aggregator", aggregator_name, aggregator_plugin).hook

    @pytest.fixture
    def aggregate(self, aggregator_hook, aggregator_config):
        """Call ``fedplug_aggregate`` with keyword arguments, as the server does."""

        def call(
            global_weights: StateDict,
            updates: Iterable[ClientUpdate],
            state: dict | None = None,
            round_number: int = 1,
        ) -> StateDict:
            result = aggregator_hook.fedplug_aggregate(
                global_weights=global_weights,
                updates=updates,
                round_number=round_number,
                config=dict(aggregator_config),
                state={} if state is None else state,
            )
            assert result is not None, "no fedplug_aggregate implementation answered (it returned None)"
            checks.assert_is_state_dict(result, "fedplug_aggregate's result")
            return result

        return call

    # -- the contract -------------------------------------------------------

    def test_config_file_composes(self, aggregator_name):
        """``aggregator/<name>.yaml`` composes into fedplug's config as a run composes it (skipped without one)."""
        check_config_file("aggregator", aggregator_name)

    def test_single_update_gives_its_weights(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        update = fedplug_client_updates[0]
        result = aggregate(fedplug_state_dict, [update])
        checks.assert_same_layout(result, fedplug_state_dict)
        if self.consensus_is_fixed_point:
            checks.assert_states_close(result, update.weights, "aggregate of one update")
        else:
            self._assert_moves_towards(result, fedplug_state_dict, update.weights)

    def test_identical_equal_weight_updates_give_that_value(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        common = fedplug_client_updates[0].weights
        updates = [make_update(clone_state(common), f"client-{i}", num_examples=16) for i in range(3)]
        result = aggregate(fedplug_state_dict, updates)
        checks.assert_same_layout(result, fedplug_state_dict)
        if self.consensus_is_fixed_point:
            checks.assert_states_close(result, common, "aggregate of identical updates")
        else:
            self._assert_moves_towards(result, fedplug_state_dict, common)

    def test_unchanged_clients_leave_global_weights_unchanged(self, aggregate, fedplug_state_dict):
        # Clients that did not move (e.g. nothing to learn) must not move the model:
        # true of averaging, robust rules and server optimisers alike at round 1.
        updates = [make_update(clone_state(fedplug_state_dict), f"client-{i}", 10 * (i + 1)) for i in range(3)]
        result = aggregate(fedplug_state_dict, updates)
        checks.assert_states_close(result, fedplug_state_dict, "aggregate of unchanged clients")

    def test_inputs_are_not_mutated(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        global_before = clone_state(fedplug_state_dict)
        updates_before = clone_updates(fedplug_client_updates)
        aggregate(fedplug_state_dict, fedplug_client_updates)
        checks.assert_states_equal(fedplug_state_dict, global_before, "global_weights after aggregation")
        for before, after in zip(updates_before, fedplug_client_updates):
            checks.assert_states_equal(after.weights, before.weights, f"update {after.client_id} after aggregation")

    def test_names_shapes_dtypes_preserved(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        result = aggregate(fedplug_state_dict, fedplug_client_updates)
        checks.assert_same_layout(result, fedplug_state_dict)
        counter = result["backbone.bn.num_batches_tracked"]
        assert counter.dtype == torch.int64, "the int64 num_batches_tracked buffer must stay int64"

    def test_result_is_finite(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        checks.assert_finite(aggregate(fedplug_state_dict, fedplug_client_updates))

    def test_deterministic(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        first = aggregate(fedplug_state_dict, clone_updates(fedplug_client_updates), state={})
        second = aggregate(fedplug_state_dict, clone_updates(fedplug_client_updates), state={})
        checks.assert_states_equal(first, second, "second aggregation of the same inputs")

    def test_result_survives_wire_format(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        result = aggregate(fedplug_state_dict, fedplug_client_updates)
        try:
            decoded = checks.wire_round_trip(result, fedplug_state_dict)
        except Exception as exc:  # what the server hits when it sends the new global model
            pytest.fail(f"the result does not survive the wire format: {type(exc).__name__}: {exc}")
        checks.assert_states_equal(decoded, dict(result), "result after a wire round trip")

    def test_empty_round_raises_empty_round_error(self, aggregate, fedplug_state_dict):
        with pytest.raises(EmptyRoundError):
            aggregate(fedplug_state_dict, iter(()))
        with pytest.raises(EmptyRoundError):
            aggregate(fedplug_state_dict, [])

    def test_consumes_updates_as_one_shot_stream(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        from_list = aggregate(fedplug_state_dict, clone_updates(fedplug_client_updates), state={})
        stream = CountingStream(clone_updates(fedplug_client_updates))
        from_stream = aggregate(fedplug_state_dict, stream, state={})
        assert stream.exhausted, (
            f"the aggregator consumed {stream.consumed} of {len(fedplug_client_updates)} updates; "
            "it must take every update the round delivers"
        )
        checks.assert_states_close(from_stream, from_list, "aggregate of a one-shot stream vs of a list")

    def test_aggregates_a_lazily_filled_stream(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        from_list = aggregate(fedplug_state_dict, clone_updates(fedplug_client_updates), state={})
        lazy = _lazy_stream(clone_updates(fedplug_client_updates))
        from_lazy = aggregate(fedplug_state_dict, lazy, state={})
        checks.assert_states_close(from_lazy, from_list, "aggregate of a lazily filled stream vs of a list")

    def test_state_holds_only_tensors_numbers_strings(self, aggregate, fedplug_state_dict, fedplug_client_updates):
        state: dict = {}
        weights = fedplug_state_dict
        for round_number in (1, 2):
            updates = [
                make_update(clone_state(u.weights), u.client_id, u.num_examples, round_number)
                for u in fedplug_client_updates
            ]
            weights = aggregate(weights, updates, state=state, round_number=round_number)
        assert isinstance(state, dict)
        checks.assert_plain_state(state)

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _assert_moves_towards(result: StateDict, start: StateDict, target: StateDict) -> None:
        moved = False
        for name, s in start.items():
            r, t = result[name], target[name]
            if s.is_floating_point():
                towards = (r.double() - s.double()) * (t.double() - s.double())
                assert bool((towards >= 0).all()), f"result[{name!r}] moves away from the clients' value"
                moved = moved or not torch.equal(r, s)
            else:
                lo, hi = torch.minimum(s, t), torch.maximum(s, t)
                assert bool(((r >= lo) & (r <= hi)).all()), (
                    f"integer result[{name!r}] = {r.tolist()} is outside [global, client] = "
                    f"[{s.tolist()}, {t.tolist()}]"
                )
        assert moved, "the result did not move from the global weights towards the clients' value"
