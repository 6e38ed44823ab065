"""Robust aggregators (fedmedian, trimmed_mean, krum, multikrum) against numpy computations of their
papers' definitions, and against outliers / Byzantine clients.

The hook contract (layout, no mutation, streams, empty rounds) is checked for
every aggregator in ``test_aggregators.py``.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from fedplug.plugins import load_plugin, new_manager
from fedplug.types import ClientUpdate

torch.set_num_threads(1)


def aggregate(name: str, global_weights, updates, **params):
    pm = new_manager()
    pm.register(load_plugin("aggregator", name)[1], name=f"aggregator:{name}")
    return pm.hook.fedplug_aggregate(
        global_weights=global_weights, updates=updates, round_number=1,
        config={"name": name, **params}, state={},
    )


def random_updates(n: int, seed: int = 0, counts=None) -> tuple[dict, list[ClientUpdate]]:
    g = torch.Generator().manual_seed(seed)
    base = {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.randn(5, generator=g),
        "bn.running_var": torch.rand(5, generator=g) + 0.5,
        "bn.num_batches_tracked": torch.tensor(10),
    }
    updates = []
    for i in range(n):
        weights = {k: (v + 0.3 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v + 3 * i
                   for k, v in base.items()}
        weights["bn.running_var"] = weights["bn.running_var"].abs()
        updates.append(ClientUpdate(f"c{i}", 1, weights, (counts or [1] * n)[i], 0.0))
    return base, updates


def stacked(updates, name) -> np.ndarray:
    return np.stack([u.weights[name].double().numpy() for u in updates])


# -- median / trimmed mean -----------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 6])
def test_median_is_numpy_median_unweighted(n):
    base, updates = random_updates(n, seed=n, counts=[1, 100, 3, 4, 5, 6][:n])
    result = aggregate("fedmedian", base, updates)
    for name in ("w", "b", "bn.running_var"):
        np.testing.assert_allclose(result[name].double().numpy(), np.median(stacked(updates, name), axis=0),
                                   rtol=1e-6, atol=1e-7)
    counter = np.median(stacked(updates, "bn.num_batches_tracked"))
    assert result["bn.num_batches_tracked"].item() == np.rint(counter) and result["bn.num_batches_tracked"].dtype == torch.int64


def np_trimmed_mean(values: np.ndarray, beta: float) -> np.ndarray:
    """Yin et al. 2018: drop the floor(beta*N) largest and smallest values per coordinate, average the rest."""
    n = values.shape[0]
    k = int(np.floor(beta * n))
    out = np.empty(values.shape[1:])
    for idx in np.ndindex(*values.shape[1:]):
        column = sorted(values[(slice(None),) + idx])
        out[idx] = np.mean(column[k : n - k])
    return out


@pytest.mark.parametrize("n, beta", [(5, 0.2), (7, 0.3), (4, 0.1), (10, 0.45)])
def test_trimmed_mean_matches_its_definition(n, beta):
    base, updates = random_updates(n, seed=10 + n)
    result = aggregate("trimmed_mean", base, updates, beta=beta)
    for name in ("w", "b", "bn.running_var"):
        np.testing.assert_allclose(result[name].double().numpy(), np_trimmed_mean(stacked(updates, name), beta),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name, params", [("fedmedian", {}), ("trimmed_mean", {"beta": 0.2})])
def test_coordinatewise_rules_resist_an_outlier(name, params):
    base, honest = random_updates(4, seed=3)
    byzantine = ClientUpdate("evil", 1, {k: (v + 1e6 if v.is_floating_point() else v * 10**6)
                                         for k, v in honest[0].weights.items()}, 10**6, 0.0)
    updates = honest + [byzantine]
    robust = aggregate(name, base, updates, **params)
    naive = aggregate("fedavg", base, updates)
    for key in ("w", "b", "bn.running_var"):
        lo = stacked(honest, key).min(axis=0)
        hi = stacked(honest, key).max(axis=0)
        value = robust[key].double().numpy()
        assert np.all((value >= lo - 1e-6) & (value <= hi + 1e-6)), f"{name}'s {key} left the honest range"
        assert np.abs(naive[key].double().numpy()).max() > 1e5  # the outlier does move FedAvg
    assert robust["bn.num_batches_tracked"].item() < 100


# -- Krum / Multi-Krum -----------------------------------------------------------


def np_krum_scores(vectors: np.ndarray, f: int) -> np.ndarray:
    """Blanchard et al. 2017: s(i) = sum of squared distances to the n - f - 2 closest other vectors."""
    n = len(vectors)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(d[: n - f - 2]))
    return np.array(scores)


def flat(update: ClientUpdate) -> np.ndarray:
    return np.concatenate([update.weights[k].double().numpy().ravel() for k in ("w", "b", "bn.running_var")])


@pytest.mark.parametrize("n, f, seed", [(5, 1, 0), (7, 2, 1), (9, 1, 2), (6, 0, 3)])
def test_krum_selects_the_argmin_of_its_score(n, f, seed):
    base, updates = random_updates(n, seed=seed)
    expected = int(np.argmin(np_krum_scores(np.stack([flat(u) for u in updates]), f)))
    result = aggregate("krum", base, updates, num_byzantine=f)
    for key in base:
        assert torch.equal(result[key], updates[expected].weights[key]), key


@pytest.mark.parametrize("n, f, m", [(7, 2, 3), (6, 1, None), (9, 2, 9)])
def test_multikrum_averages_the_m_best(n, f, m):
    base, updates = random_updates(n, seed=20 + n, counts=list(range(1, n + 1)))
    scores = np_krum_scores(np.stack([flat(u) for u in updates]), f)
    chosen = np.argsort(scores, kind="stable")[: (n - f if m is None else m)]
    result = aggregate("multikrum", base, updates, num_byzantine=f, num_selected=m)
    for key in ("w", "b", "bn.running_var"):
        expected = np.mean([updates[i].weights[key].double().numpy() for i in chosen], axis=0)  # unweighted
        np.testing.assert_allclose(result[key].double().numpy(), expected, rtol=1e-6, atol=1e-7)
    counters = [updates[i].weights["bn.num_batches_tracked"].item() for i in chosen]
    assert result["bn.num_batches_tracked"].item() == np.rint(np.mean(counters))


def test_krum_picks_an_honest_update_against_byzantine_ones():
    base, honest = random_updates(6, seed=5)
    attackers = [
        ClientUpdate(f"evil{j}", 1, {k: (v * -50.0 if v.is_floating_point() else v)
                                     for k, v in honest[j].weights.items()}, 10**6, 0.0)
        for j in range(2)
    ]
    updates = [attackers[0]] + honest + [attackers[1]]
    result = aggregate("krum", base, updates, num_byzantine=2)
    matches = [u.client_id for u in updates if all(torch.equal(result[k], u.weights[k]) for k in base)]
    assert len(matches) == 1 and matches[0].startswith("c")
    multi = aggregate("multikrum", base, updates, num_byzantine=2)
    honest_mean = np.mean([u.weights["w"].double().numpy() for u in honest], axis=0)
    np.testing.assert_allclose(multi["w"].double().numpy(), honest_mean, rtol=1e-6, atol=1e-6)


def test_krum_with_too_few_updates_warns_and_still_returns_one_of_them(caplog):
    base, updates = random_updates(3, seed=8)
    with caplog.at_level(logging.WARNING, logger="fedplug_plugins.aggregators.krum"):
        result = aggregate("krum", base, updates, num_byzantine=1)
    assert any("needs more than 4 updates" in r.getMessage() for r in caplog.records)
    assert any(all(torch.equal(result[k], u.weights[k]) for k in base) for u in updates)


def test_krum_ignores_reported_num_examples():
    base, updates = random_updates(5, seed=9)
    louder = [ClientUpdate(u.client_id, 1, u.weights, 10**9 if i == 0 else 1, 0.0) for i, u in enumerate(updates)]
    a = aggregate("multikrum", base, updates, num_byzantine=1)
    b = aggregate("multikrum", base, louder, num_byzantine=1)
    assert all(torch.equal(a[k], b[k]) for k in base)


@pytest.mark.parametrize("name, params", [("fedmedian", {}), ("trimmed_mean", {"beta": 0.2}),
                                          ("krum", {"num_byzantine": 1}), ("multikrum", {"num_byzantine": 1})])
def test_chunked_arithmetic_matches_the_unchunked_result(name, params, monkeypatch):
    """Robust aggregators walk the model in chunks of coordinates; chunk boundaries must not change anything."""
    from fedplug_plugins.aggregators import _buffer

    base, updates = random_updates(7, seed=31)
    whole = aggregate(name, base, updates, **params)
    monkeypatch.setattr(_buffer, "CHUNK", 5)  # 12- and 5-element tensors now span several chunks
    chunked = aggregate(name, base, updates, **params)
    for key in base:
        assert torch.equal(whole[key], chunked[key]), key
