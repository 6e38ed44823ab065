"""fedavg_clipped against an independent computation of its definition."""

import math

import pytest
import torch

from fedplug import plugins
from fedplug.testing.data import make_update, make_updates, perturbed, sample_state_dict
from fedplug.types import EmptyRoundError
from fedplug_example import clipped, norms

torch.set_num_threads(1)


def aggregate(global_weights, updates, **config):
    pm = plugins.activate({"aggregator": "fedavg_clipped"}, observers=False).pm
    return pm.hook.fedplug_aggregate(
        global_weights=global_weights, updates=iter(updates), round_number=1,
        config={"name": "fedavg_clipped", **config}, state={},
    )


def flat(state):
    """All floating-point tensors as one float64 vector, in name order."""
    return torch.cat([state[k].double().flatten() for k in sorted(state) if state[k].is_floating_point()])


def expected(global_weights, updates, max_norm, server_lr=1.0):
    """The definition, on flattened vectors: clip each delta to max_norm, weighted mean, server step."""
    g = flat(global_weights)
    total = sum(u.num_examples for u in updates)
    step = torch.zeros_like(g)
    for u in updates:
        delta = flat(u.weights) - g
        delta = delta * min(1.0, max_norm / float(torch.linalg.vector_norm(delta)))
        step += u.num_examples / total * delta
    return g + server_lr * step


def test_matches_the_definition_when_some_updates_are_clipped():
    g = sample_state_dict(0)
    updates = make_updates(g, count=3, scale=0.1)
    norms_before = [float(torch.linalg.vector_norm(flat(u.weights) - flat(g))) for u in updates]
    max_norm = sorted(norms_before)[1]  # clips exactly the largest update
    result = aggregate(g, updates, max_norm=max_norm, server_lr=0.5)
    torch.testing.assert_close(flat(result), expected(g, updates, max_norm, 0.5).float().double())


def test_without_clipping_it_is_fedavg():
    g = sample_state_dict(0)
    updates = make_updates(g, count=3)
    ours = aggregate(g, updates, max_norm=1e6)
    fedavg = plugins.activate({"aggregator": "fedavg"}, observers=False).pm.hook.fedplug_aggregate(
        global_weights=g, updates=updates, round_number=1, config={"name": "fedavg"}, state={}
    )
    for name in g:
        torch.testing.assert_close(ours[name], fedavg[name])


def test_one_huge_update_moves_the_model_at_most_its_share_of_max_norm():
    g = sample_state_dict(0)
    honest = make_updates(g, count=3, scale=0.01)
    attacker = make_update(perturbed(g, seed=99, scale=1000.0), "attacker", num_examples=40)
    result = aggregate(g, honest + [attacker], max_norm=1.0)
    moved = float(torch.linalg.vector_norm(flat(result) - flat(g)))
    # Each clipped update has norm <= 1, so the weighted mean has norm <= 1.
    assert moved <= 1.0 + 1e-6
    unclipped = aggregate(g, honest + [attacker], max_norm=1e12)
    assert float(torch.linalg.vector_norm(flat(unclipped) - flat(g))) > 100


def test_integer_buffers_get_the_rounded_weighted_mean():
    g = sample_state_dict(0)
    updates = make_updates(g, count=3)  # counters 110, 120, 130 with 10, 20, 30 examples
    result = aggregate(g, updates, max_norm=0.01)
    counter = result["backbone.bn.num_batches_tracked"]
    assert counter.dtype == torch.int64
    assert int(counter) == round((110 * 10 + 120 * 20 + 130 * 30) / 60)


def test_norms_are_published_for_the_observer():
    norms.clear()
    g = sample_state_dict(0)
    updates = make_updates(g, count=2)
    clipped.aggregate_clipped(g, iter(updates), max_norm=0.5, round_number=7)
    published = {n.client_id: n for n in norms.take(7)}
    assert set(published) == {"client-0", "client-1"}
    for u in updates:
        n = published[u.client_id]
        assert math.isclose(n.delta_l2, float(torch.linalg.vector_norm(flat(u.weights) - flat(g))), rel_tol=1e-9)
        assert math.isclose(n.clip_factor, min(1.0, 0.5 / n.delta_l2), rel_tol=1e-9)
    assert norms.take(7) == []


def test_empty_round():
    with pytest.raises(EmptyRoundError):
        aggregate(sample_state_dict(0), [], max_norm=1.0)


@pytest.mark.parametrize("key, value", [("max_norm", 0), ("max_norm", -1.0), ("max_norm", "big"),
                                        ("server_lr", 0), ("max_norm", float("inf"))])
def test_bad_config_names_the_key(key, value):
    with pytest.raises(clipped.ClippingConfigError, match=rf"aggregator\.{key}"):
        clipped.read_config({"name": "fedavg_clipped", key: value})
    # The server calls this hook before round 1, so the error comes before any training.
    pm = plugins.activate({"aggregator": "fedavg_clipped"}, observers=False).pm
    with pytest.raises(clipped.ClippingConfigError):
        pm.hook.fedplug_aggregator_round_settings(round_number=1, config={key: value})
