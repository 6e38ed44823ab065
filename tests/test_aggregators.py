"""The built-in aggregators: every one against the hook contract, the FedAvg family against
independent numpy computations of their papers' formulas, and FedAvg's streaming memory behaviour.

Robust aggregators (median, trimmed mean, Krum) have their reference tests in
``test_aggregators_robust.py``.
"""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedplug.plugins import load_plugin, new_manager
from fedplug.types import ClientUpdate, EmptyRoundError

torch.set_num_threads(1)

CONF = Path(__file__).resolve().parents[1] / "conf" / "aggregator"
ALL = ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
       "fedmedian", "trimmed_mean", "krum", "multikrum"]
STREAMING = ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]
STATEFUL = ["fedavgm", "fedadam", "fedyogi", "fedadagrad"]


# -- helpers -----------------------------------------------------------------


def yaml_config(name: str) -> dict:
    return yaml.safe_load((CONF / f"{name}.yaml").read_text())


def hook_for(name: str):
    """The plugin loaded from its entry point and registered with pluggy, as the server does."""
    pm = new_manager()
    _, plugin = load_plugin("aggregator", name)
    pm.register(plugin, name=f"aggregator:{name}")
    return pm.hook


def aggregate(name, global_weights, updates, state=None, config=None, round_number=1):
    return hook_for(name).fedplug_aggregate(
        global_weights=global_weights,
        updates=updates,
        round_number=round_number,
        config=yaml_config(name) if config is None else config,
        state={} if state is None else state,
    )


def model_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small detector-like state: conv + BatchNorm (with its int64 counter) + mixed float dtypes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "bn.weight": 1 + 0.1 * torch.randn(4, generator=g),
        "bn.bias": 0.1 * torch.randn(4, generator=g),
        "bn.running_mean": torch.randn(4, generator=g),
        "bn.running_var": 1 + torch.rand(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(100, dtype=torch.int64),
        "head.half": torch.randn(5, generator=g).to(torch.float16),
        "head.double": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "head.mask": torch.tensor([True, False, True]),
    }


def client_state(base: dict, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """``base`` after a pretend local round: floats perturbed, the batch counter advanced."""
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for name, t in base.items():
        if t.is_floating_point():
            noise = scale * torch.randn(t.shape, generator=g, dtype=torch.float64)
            out[name] = (t.double() + noise).to(t.dtype)
        elif t.dtype == torch.bool:
            out[name] = torch.rand(t.shape, generator=g) > 0.5
        else:
            out[name] = t + 7 * (seed + 1)
    out["bn.running_var"] = out["bn.running_var"].abs() + 0.01
    return out


def updates_for(base: dict, counts=(10, 30, 7), round_number: int = 1) -> list[ClientUpdate]:
    return [ClientUpdate(f"c{i}", round_number, client_state(base, 97 * round_number + i), n, 1.0)
            for i, n in enumerate(counts)]


def clone(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def np64(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def np_weighted_mean(updates: list[ClientUpdate], name: str) -> np.ndarray:
    """FedAvg's definition, written independently: sum_k (n_k / n) w_k in float64."""
    n = sum(u.num_examples for u in updates)
    return sum((u.num_examples / n) * np64(u.weights[name]) for u in updates)


def assert_close_to(result: torch.Tensor, expected: np.ndarray, rtol=1e-6, atol=1e-6):
    tol = {torch.float16: (1e-3, 1e-3), torch.bfloat16: (1e-2, 1e-2)}.get(result.dtype, (rtol, atol))
    np.testing.assert_allclose(np64(result), expected, rtol=tol[0], atol=tol[1])


class OneShot:
    """An iterable that fails the test if iterated a second time, like the server's update stream."""

    def __init__(self, items):
        self.items = list(items)
        self.iterated = False

    def __iter__(self):
        assert not self.iterated, "the update stream was iterated twice"
        self.iterated = True
        items, self.items = self.items, None  # the stream does not keep what it delivered
        return iter(items)


# -- the contract, for every built-in aggregator ------------------------------


@pytest.mark.parametrize("name", ALL)
def test_config_yaml_names_the_plugin_and_is_accepted(name):
    cfg = yaml_config(name)
    assert cfg["name"] == name
    first_line = (CONF / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("#") and f"aggregator={name}" in first_line
    base = model_state()
    assert aggregate(name, base, updates_for(base), config=cfg) is not None


@pytest.mark.parametrize("name", ALL)
def test_layout_dtypes_and_integer_buffers_preserved(name):
    base = model_state()
    result = aggregate(name, base, updates_for(base))
    assert list(result) == list(base)
    for key, ref in base.items():
        assert result[key].dtype == ref.dtype, key
        assert result[key].shape == ref.shape, key
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    assert result["head.mask"].dtype == torch.bool
    assert all(bool(torch.isfinite(t).all()) for t in result.values() if t.is_floating_point())


@pytest.mark.parametrize("name", ALL)
def test_inputs_not_mutated_and_result_not_aliased(name):
    base = model_state()
    updates = updates_for(base)
    base_before, updates_before = clone(base), [clone(u.weights) for u in updates]
    state: dict = {}
    result = aggregate(name, base, updates, state=state)
    aggregate(name, base, updates_for(base, round_number=2), state=state, round_number=2)
    for key in base:
        assert torch.equal(base[key], base_before[key]), f"global {key} mutated"
        for u, before in zip(updates, updates_before):
            assert torch.equal(u.weights[key], before[key]), f"{u.client_id}'s {key} mutated"
    inputs = {t.data_ptr() for t in base.values()} | {t.data_ptr() for u in updates for t in u.weights.values()}
    assert not inputs & {t.data_ptr() for t in result.values()}, "the result shares memory with an input"


@pytest.mark.parametrize("name", ALL)
def test_empty_round_raises(name):
    with pytest.raises(EmptyRoundError):
        aggregate(name, model_state(), iter(()))


@pytest.mark.parametrize("name", ALL)
def test_one_shot_stream_gives_the_same_result_as_a_list(name):
    base = model_state()
    from_list = aggregate(name, base, updates_for(base))
    from_stream = aggregate(name, base, OneShot(updates_for(base)))
    for key in base:
        assert torch.equal(from_list[key], from_stream[key]), key


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedmedian", "trimmed_mean", "krum", "multikrum"])
def test_single_update_is_returned_exactly(name):
    base = model_state()
    update = updates_for(base, counts=(12,))[0]
    result = aggregate(name, base, [update])
    for key in base:
        assert torch.equal(result[key], update.weights[key]), key


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("fedavgm", "server_momentum", 1.0),
        ("fedavgm", "server_lr", 0),
        ("fedadam", "beta2", -0.1),
        ("fedyogi", "tau", "small"),
        ("fedadagrad", "eta", float("nan")),
        ("fedprox", "proximal_mu", -1),
        ("trimmed_mean", "beta", 0.5),
        ("krum", "num_byzantine", 1.5),
        ("multikrum", "num_selected", 0),
        ("fedavg", "server_lr", 1.0),  # fedavg has no parameters: a typo must not pass silently
        ("fedadagrad", "beta2", 0.9),  # FedAdagrad has no second-moment decay
    ],
)
def test_bad_config_value_names_the_key(name, key, value):
    cfg = {**yaml_config(name), key: value}
    base = model_state()
    with pytest.raises(ValueError, match=f"aggregator.{key}"):
        aggregate(name, base, updates_for(base), config=cfg)


@pytest.mark.parametrize("name", STATEFUL)
def test_state_survives_a_safetensors_checkpoint(name):
    """Round 3 after a checkpoint/restore of ``state`` equals round 3 without one."""
    base = model_state()
    state: dict = {}
    weights = base
    for r in (1, 2):
        weights = aggregate(name, weights, updates_for(weights, round_number=r), state=state, round_number=r)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    restored = st_load(st_save(state))  # what the server's checkpoint does
    direct = aggregate(name, weights, updates_for(weights, round_number=3), state=state, round_number=3)
    resumed = aggregate(name, weights, updates_for(weights, round_number=3), state=restored, round_number=3)
    for key in base:
        assert torch.equal(direct[key], resumed[key]), key
    assert state.keys() == restored.keys()


@pytest.mark.parametrize("name", STATEFUL)
def test_previous_state_tensors_are_replaced_not_modified(name):
    """The server may still be checkpointing round t's state while round t+1 aggregates."""
    base = model_state()  # includes a float64 parameter, whose state is float64 too
    state: dict = {}
    weights = aggregate(name, base, updates_for(base), state=state)
    previous = dict(state)
    snapshot = {k: v.clone() for k, v in state.items()}
    aggregate(name, weights, updates_for(weights, round_number=2), state=state, round_number=2)
    for key, tensor in previous.items():
        assert torch.equal(tensor, snapshot[key]), f"{key} of the previous round was modified in place"
        assert not torch.equal(state[key], snapshot[key]), f"{key} did not advance"


@pytest.mark.parametrize("name", STATEFUL)
def test_state_from_another_model_is_a_clear_error_and_state_is_untouched(name):
    base = model_state()
    state: dict = {}
    aggregate(name, base, updates_for(base), state=state)
    key = next(iter(state))
    state[key] = torch.zeros(7, 7)
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match="another model"):
        aggregate(name, base, updates_for(base), state=state, round_number=2)
    assert all(torch.equal(state[k], before[k]) for k in before)


# -- FedAvg ------------------------------------------------------------------


def test_fedavg_is_the_example_weighted_mean():
    base = model_state()
    updates = updates_for(base, counts=(10, 30, 7, 1))
    result = aggregate("fedavg", base, updates)
    for key, ref in base.items():
        expected = np_weighted_mean(updates, key)
        if ref.is_floating_point():
            assert_close_to(result[key], expected)
        elif ref.dtype == torch.bool:
            np.testing.assert_array_equal(result[key].numpy(), expected > 0.5)  # weighted majority
        else:
            np.testing.assert_array_equal(result[key].numpy(), np.rint(expected))


def test_fedavg_integer_buffer_rounds_the_weighted_mean():
    base = {"n": torch.tensor([0, 0], dtype=torch.int64), "w": torch.zeros(2)}
    ups = [ClientUpdate("a", 1, {"n": torch.tensor([10, 3]), "w": torch.zeros(2)}, 1, 0.0),
           ClientUpdate("b", 1, {"n": torch.tensor([20, 4]), "w": torch.ones(2)}, 2, 0.0)]
    result = aggregate("fedavg", base, ups)
    # (1*10 + 2*20)/3 = 16.67 -> 17 ; (1*3 + 2*4)/3 = 3.67 -> 4
    assert result["n"].tolist() == [17, 4] and result["n"].dtype == torch.int64


def test_fedavg_rejects_updates_that_do_not_match_or_carry_no_weight():
    base = model_state()
    bad = clone(base)
    bad["conv.bias"] = torch.zeros(5)
    with pytest.raises(ValueError, match="conv.bias"):
        aggregate("fedavg", base, [ClientUpdate("x", 1, bad, 3, 0.0)])
    with pytest.raises(ValueError, match="num_examples"):
        aggregate("fedavg", base, [ClientUpdate("x", 1, clone(base), 0, 0.0)])
    with pytest.raises(ValueError, match="num_examples"):
        aggregate("fedavg", base, [ClientUpdate("x", 1, clone(base), -2, 0.0)])


@pytest.mark.parametrize("name", STREAMING)
def test_streaming_aggregators_drop_each_update_once_consumed(name):
    """While the stream produces update k, no earlier update's tensors may still be alive."""
    base = model_state()
    produced = []

    def stream():
        previous: list[weakref.ref] = []
        for i in range(6):
            # Resumed by the aggregator's next(): everything it consumed so far must be gone.
            leaked = [r for r in previous if r() is not None]
            assert not leaked, f"{len(leaked)} tensors of update {i - 1} still referenced when update {i} arrives"
            update = ClientUpdate(f"c{i}", 1, client_state(base, i), 5 + i, 1.0)
            previous = [weakref.ref(t) for t in update.weights.values()]
            produced.append(i)
            yield update
            del update

    aggregate(name, base, stream())
    assert produced == list(range(6))


# -- FedProx -----------------------------------------------------------------


def test_fedprox_sends_mu_and_aggregates_like_fedavg():
    hook = hook_for("fedprox")
    assert hook.fedplug_aggregator_round_settings(round_number=1, config={"name": "fedprox"}) == {"proximal_mu": 0.01}
    assert hook.fedplug_aggregator_round_settings(
        round_number=4, config={"name": "fedprox", "proximal_mu": 0.5}) == {"proximal_mu": 0.5}
    assert hook_for("fedavg").fedplug_aggregator_round_settings(round_number=1, config={"name": "fedavg"}) is None
    base = model_state()
    prox = aggregate("fedprox", base, updates_for(base), config={"name": "fedprox", "proximal_mu": 0.3})
    avg = aggregate("fedavg", base, updates_for(base))
    assert all(torch.equal(prox[k], avg[k]) for k in base)


# -- server optimisers: independent numpy references over several rounds -------

STEPPED = ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "head.half", "head.double"]
AVERAGED = ["bn.running_mean", "bn.running_var"]


def run_rounds(name: str, config: dict, rounds: int = 3):
    """Run ``rounds`` rounds, each starting from the previous result; return per-round (global, updates, result)."""
    state: dict = {}
    weights = model_state()
    history = []
    for r in range(1, rounds + 1):
        updates = updates_for(weights, counts=(10, 30, 7), round_number=r)
        result = aggregate(name, weights, updates, state=state, config=config, round_number=r)
        history.append((weights, updates, result))
        weights = result
    return history


def check_buffers_are_plain_fedavg(weights, updates, result):
    for key in AVERAGED:
        assert_close_to(result[key], np_weighted_mean(updates, key))
    assert result["bn.num_batches_tracked"].item() == round(np_weighted_mean(updates, "bn.num_batches_tracked").item())


@pytest.mark.parametrize("lr, beta", [(1.0, 0.9), (0.5, 0.0), (0.3, 0.7)])
def test_fedavgm_matches_hsu_et_al(lr, beta):
    config = {"name": "fedavgm", "server_lr": lr, "server_momentum": beta}
    velocity = {k: 0.0 for k in STEPPED}
    for weights, updates, result in run_rounds("fedavgm", config):
        for key in STEPPED:
            w = np64(weights[key])
            pseudo_grad = w - np_weighted_mean(updates, key)  # Hsu et al.: Δw = w_t - avg
            velocity[key] = beta * velocity[key] + pseudo_grad
            assert_close_to(result[key], w - lr * velocity[key])
        check_buffers_are_plain_fedavg(weights, updates, result)


def test_fedavgm_without_momentum_at_unit_rate_is_fedavg():
    base = model_state()
    m = aggregate("fedavgm", base, updates_for(base), config={"name": "fedavgm", "server_lr": 1.0, "server_momentum": 0.0})
    a = aggregate("fedavg", base, updates_for(base))
    for key in base:
        assert_close_to(m[key], np64(a[key]))


def np_fedopt_reference(variant: str, eta: float, beta1: float, beta2: float, tau: float):
    """Reddi et al. 2021, Algorithm 2, in numpy: returns a stepper over (w, delta, moments)."""

    def step(w, delta, mv):
        m, v = mv if mv is not None else (0.0, tau * tau)
        m = beta1 * m + (1 - beta1) * delta
        if variant == "adagrad":
            v = v + delta**2
        elif variant == "yogi":
            v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        else:
            v = beta2 * v + (1 - beta2) * delta**2
        return w + eta * m / (np.sqrt(v) + tau), (m, v)

    return step


@pytest.mark.parametrize("variant", ["adam", "yogi", "adagrad"])
def test_fedopt_matches_reddi_et_al_over_three_rounds(variant):
    eta, beta1, beta2, tau = 0.02, 0.8, 0.95, 1e-2
    config = {"name": f"fed{variant}", "eta": eta, "beta1": beta1, "tau": tau}
    if variant != "adagrad":
        config["beta2"] = beta2
    step = np_fedopt_reference(variant, eta, beta1, beta2, tau)
    moments: dict = {k: None for k in STEPPED}
    for weights, updates, result in run_rounds(f"fed{variant}", config):
        for key in STEPPED:
            w = np64(weights[key])
            delta = np_weighted_mean(updates, key) - w
            expected, moments[key] = step(w, delta, moments[key])
            assert_close_to(result[key], expected, rtol=1e-5, atol=1e-6)
        check_buffers_are_plain_fedavg(weights, updates, result)


def test_fedadam_state_holds_its_moments_per_stepped_tensor():
    state: dict = {}
    base = model_state()
    aggregate("fedadam", base, updates_for(base), state=state)
    assert set(state) == {f"{p}/{k}" for p in ("m", "v") for k in STEPPED}
    assert state["m/head.half"].dtype == torch.float32  # never half-precision moments
    assert state["m/head.double"].dtype == torch.float64
    assert bool((state["v/conv.weight"] > 0).all())
