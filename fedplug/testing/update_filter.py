"""The update-filter contract: what a client relies on from ``fedplug_filter_update``.

Subclass :class:`UpdateFilterContract` in your plugin's tests, parametrize it
with your filter's entry-point name and give the settings an aggregator would
send it (an update filter has no config file: its ``config`` comes from the
aggregator's round settings)::

    import pytest
    from fedplug.testing import UpdateFilterContract

    pytest_plugins = ["fedplug.testing.plugin"]

    @pytest.mark.parametrize("update_filter_name", ["my_filter"])
    class TestMyFilter(UpdateFilterContract):
        @pytest.fixture
        def update_filter_config(self, update_filter_name):
            return {"name": update_filter_name, "clip_norm": 1.0}

The filter is loaded through its entry point (or ``update_filter_plugin``) and
called through a pluggy manager, as ``fedplug.update_filter`` calls it on a client.
"""

from __future__ import annotations

from typing import Any

import pytest

from fedplug.testing import checks
from fedplug.testing.data import clone_state, perturbed, sample_state_dict
from fedplug.testing.loading import plugin_manager
from fedplug.types import TrainResult, TrainSettings


class UpdateFilterContract:
    """Checks every update filter must pass; see the module docstring for use."""

    @pytest.fixture
    def update_filter_name(self) -> str:
        pytest.fail('parametrize the suite with your filter\'s name: '
                    '@pytest.mark.parametrize("update_filter_name", ["<name>"])')

    @pytest.fixture
    def update_filter_plugin(self) -> object | None:
        return None

    @pytest.fixture
    def update_filter_config(self, update_filter_name: str) -> dict[str, Any]:
        return {"name": update_filter_name}

    @pytest.fixture
    def filter_update(self, update_filter_name, update_filter_plugin, update_filter_config):
        hook = plugin_manager("update_filter", update_filter_name, update_filter_plugin).hook

        def call(result: TrainResult, global_weights: dict, round_number: int = 1) -> TrainResult:
            out = hook.fedplug_filter_update(result=result, global_weights=global_weights,
                                             settings=TrainSettings(round_number=round_number),
                                             config=dict(update_filter_config))
            assert isinstance(out, TrainResult), (
                f"fedplug_filter_update returned {type(out).__name__}, expected fedplug.types.TrainResult")
            assert out.weights is not None, "the filtered TrainResult has no weights"
            return out

        return call

    @pytest.fixture
    def trained(self):
        global_weights = sample_state_dict(0)
        return global_weights, TrainResult(weights=perturbed(global_weights, seed=1), num_examples=12,
                                           train_loss=0.5)

    def test_result_keeps_the_model_layout_and_is_finite(self, filter_update, trained):
        global_weights, result = trained
        out = filter_update(result, global_weights)
        checks.assert_same_layout(out.weights, global_weights)
        checks.assert_finite(out.weights)

    def test_inputs_are_not_mutated(self, filter_update, trained):
        global_weights, result = trained
        global_before, weights_before = clone_state(global_weights), clone_state(result.weights)
        filter_update(result, global_weights)
        checks.assert_states_equal(global_weights, global_before, "global_weights after filtering")
        checks.assert_states_equal(result.weights, weights_before, "the training result after filtering")

    def test_result_survives_the_wire_format(self, filter_update, trained):
        global_weights, result = trained
        out = filter_update(result, global_weights)
        decoded = checks.wire_round_trip(out.weights, global_weights)
        checks.assert_states_equal(decoded, dict(out.weights), "filtered weights after a wire round trip")

    def test_keeps_what_the_client_reports(self, filter_update, trained):
        global_weights, result = trained
        out = filter_update(result, global_weights)
        assert out.ok and out.num_examples == result.num_examples, (
            "a filter must not change ok or num_examples: the client reports them for the round")
