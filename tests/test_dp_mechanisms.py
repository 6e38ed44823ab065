"""Differential privacy's building blocks: clipping, the seeded noise, adaptive clipping, the accountant.

Unit tests on the aggregators and update filters called directly (no server):
every update's norm is bounded by the clip norm, the noise's measured std
matches noise_multiplier x clip / m (a tolerance from the sample size), the
adaptive clip norm tracks the target quantile, and the reported epsilon is the
accountant library's for the same parameters.
"""

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedplug.plugins import activate
from fedplug.privacy import adaptive
from fedplug.privacy.accountant import epsilon
from fedplug.privacy.clipping import clip_delta_, delta_of, l2_norm
from fedplug.privacy.ledger import PrivacyLedger
from fedplug.types import ClientUpdate, PrivacyMechanism, TrainResult, TrainSettings
from fedplug.update_filter import apply_update_filter
from fedplug_plugins.aggregators.dp_fedavg import dp_fedavg_round

D = 200_000  # coordinates of the noise tests' model: the sample std is within ~0.16% (1 sigma) of the truth


def _model(n: int = D) -> dict:
    return {"w": torch.zeros(n), "bn.num_batches_tracked": torch.tensor(7)}


def _update(weights: dict, cid: str = "c", n: int = 10) -> ClientUpdate:
    return ClientUpdate(cid, 1, weights, n, 1.0)


def _config(name: str, **kw) -> dict:
    return {"name": name, "expected_clients": 3, **kw}


def _aggregate(name: str, global_weights, updates, round_number=1, state=None, **config):
    hook = activate({"aggregator": name}, observers=False).hook
    return hook.fedplug_aggregate(global_weights=global_weights, updates=iter(updates), round_number=round_number,
                                  config=_config(name, **config), state={} if state is None else state)


def test_clipping_bounds_every_update_norm():
    g = torch.Generator().manual_seed(0)
    for scale in (1e-3, 0.5, 3.0, 1e4):
        delta = {"a": scale * torch.randn(50, generator=g, dtype=torch.float64),
                 "b": scale * torch.randn(3, 4, generator=g, dtype=torch.float64)}
        before = l2_norm(delta)
        norm, factor = clip_delta_(delta, 1.5)
        assert norm == pytest.approx(before)
        assert l2_norm(delta) <= 1.5 * (1 + 1e-12)
        if before <= 1.5:
            assert factor == 1.0 and l2_norm(delta) == pytest.approx(before)  # small updates are left alone


def test_dp_fedavg_without_noise_is_the_mean_of_clipped_deltas():
    base = {"w": torch.zeros(4), "bn.num_batches_tracked": torch.tensor(7)}
    big = {"w": torch.tensor([30.0, 40.0, 0.0, 0.0]), "bn.num_batches_tracked": torch.tensor(99)}   # norm 50
    small = {"w": torch.tensor([0.0, 0.0, 0.3, 0.4]), "bn.num_batches_tracked": torch.tensor(99)}   # norm 0.5
    out = _aggregate("dp_fedavg", base, [_update(big, "a"), _update(small, "b")],
                     clip_norm=1.0, noise_multiplier=0.0, denominator="actual")
    # (clip(big) = [0.6, 0.8, 0, 0]) + small, over 2 clients
    assert torch.allclose(out["w"], torch.tensor([0.3, 0.4, 0.15, 0.2]), atol=1e-6)
    assert int(out["bn.num_batches_tracked"]) == 7  # integer buffers keep the global value: nothing unprotected
    # one huge client moves the model by at most clip / expected_clients
    moved = _aggregate("dp_fedavg", base, [_update(big)], clip_norm=1.0, noise_multiplier=0.0)
    assert float(moved["w"].norm()) == pytest.approx(1.0 / 3, rel=1e-6)


@pytest.mark.parametrize("z,clip,m,denominator", [(1.0, 0.5, 3, "expected"), (0.3, 2.0, 4, "actual")])
def test_measured_noise_std_matches_noise_multiplier_times_clip_over_clients(z, clip, m, denominator):
    base = _model()
    updates = [_update(_model(), f"c{i}") for i in range(m)]  # unchanged clients: the result is pure noise
    out = _aggregate("dp_fedavg", base, updates, clip_norm=clip, noise_multiplier=z, expected_clients=m,
                     denominator=denominator, noise_seed=1234)
    measured = float(out["w"].double().std())
    expected = z * clip / m
    # the sample std of D normal draws has relative standard error 1/sqrt(2D); allow 5 of them
    assert abs(measured / expected - 1) < 5 / math.sqrt(2 * D), (measured, expected)
    assert abs(float(out["w"].double().mean())) < 5 * expected / math.sqrt(D)


def test_noise_seed_is_a_test_seam_and_production_noise_is_fresh():
    base = _model(1000)
    updates = lambda: [_update(_model(1000))]
    seeded = [_aggregate("dp_fedavg", base, updates(), noise_seed=7)["w"] for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    other_round = _aggregate("dp_fedavg", base, updates(), round_number=2, noise_seed=7)["w"]
    assert not torch.equal(seeded[0], other_round)  # each round draws new noise even when seeded
    fresh = [_aggregate("dp_fedavg", base, updates())["w"] for _ in range(2)]  # noise_seed null: os.urandom
    assert not torch.equal(fresh[0], fresh[1])


def test_adaptive_clip_norm_tracks_the_target_quantile():
    # 20 clients whose update norms are 1, 2, ..., 20: the median norm is about 10
    base = {"w": torch.zeros(2)}
    updates = [_update({"w": torch.tensor([float(k), 0.0])}, f"c{k}") for k in range(1, 21)]
    clip = 0.5
    for rnd in range(1, 80):
        _, figures = dp_fedavg_round(base, list(updates), clip_norm=clip, noise_multiplier=0.5, round_number=rnd,
                                     expected_clients=20, noise_seed=3, count_stddev=1.0, target_quantile=0.5,
                                     clip_learning_rate=0.2)
        clip = figures.next_clip_norm
    assert 8.0 <= clip <= 12.5, clip
    # through the plugin: the state carries the clip norm from round to round
    state: dict = {}
    _aggregate("dp_fedavg_adaptive", base, list(updates), state=state, noise_multiplier=0.5, expected_clients=20,
               clipped_count_stddev=1.0, initial_clip_norm=0.5, noise_seed=3)
    assert state["dp/clip_norm"] > 0.5  # every update was clipped, so the norm grows


def test_adaptive_clipping_splits_the_noise_as_andrew_et_al():
    # z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2): z = 1, sigma_b = 1 gives 1 / sqrt(3/4)
    assert adaptive.update_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(0.75))
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        adaptive.update_noise_multiplier(1.0, 0.4)
    with pytest.raises(ValueError, match="clipping=client is not available"):
        _aggregate("dp_fedavg_adaptive", _model(4), [_update(_model(4))], clipping="client")


@pytest.mark.parametrize("accountant,cls", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_reported_epsilon_equals_the_accountant_library(accountant, cls):
    rounds = [(1.1, 0.3)] * 7 + [(0.8, 1.0)] * 2
    ours = epsilon(rounds, 1e-5, accountant)
    theirs = cls()
    theirs.history = [(1.1, 0.3, 7), (0.8, 1.0, 2)]
    assert ours == pytest.approx(theirs.get_epsilon(delta=1e-5), rel=1e-9)
    assert epsilon([], 1e-5, accountant) == 0.0
    assert epsilon([(0.0, 1.0)], 1e-5, accountant) == math.inf  # no noise: no privacy


def test_ledger_reports_epsilon_per_round_and_ends_at_the_budget():
    plugins = activate({"aggregator": "dp_fedavg"}, observers=False)
    cfg = _config("dp_fedavg", noise_multiplier=1.0)
    reference = RDPAccountant()
    ledger = PrivacyLedger({"max_epsilon": 10.0, "delta": 1e-5}, plugins, cfg, first_round=1, last_round=50)
    spent = []
    for rnd in range(1, 51):
        last = ledger.is_last(rnd)
        extra = ledger.spend(rnd)
        reference.history = [(1.0, 1.0, rnd)]
        assert extra["epsilon"] == pytest.approx(reference.get_epsilon(delta=1e-5))
        spent.append(extra["epsilon"])
        if last:
            assert "privacy.max_epsilon=10" in ledger.exhausted(rnd)
            break
        assert ledger.exhausted(rnd) is None
    reference.history = [(1.0, 1.0, len(spent) + 1)]
    assert spent[-1] <= 10.0 < reference.get_epsilon(delta=1e-5)  # stopped exactly before the budget ran out


def test_ledger_refuses_a_budget_it_cannot_keep():
    fedavg = activate({"aggregator": "fedavg"}, observers=False)
    with pytest.raises(ValueError, match="adds no differential-privacy noise"):
        PrivacyLedger({"max_epsilon": 5.0}, fedavg, {"name": "fedavg"})
    assert PrivacyLedger({}, fedavg, {"name": "fedavg"}).spend(1) == {}  # no DP: no figures
    dp = activate({"aggregator": "dp_fedavg"}, observers=False)
    with pytest.raises(ValueError, match="does not allow round 1"):
        PrivacyLedger({"max_epsilon": 0.5}, dp, _config("dp_fedavg", noise_multiplier=1.0))
    with pytest.raises(ValueError, match="privacy.delta must be"):
        PrivacyLedger({"delta": 0}, dp, _config("dp_fedavg"))
    with pytest.raises(ValueError, match="privacy has no setting privacy.max_eps"):
        PrivacyLedger({"max_eps": 1}, dp, _config("dp_fedavg"))
    with pytest.raises(ValueError, match="PrivacyMechanism.kind"):
        PrivacyMechanism("global", 1.0)


def _train_result(weights: dict) -> TrainResult:
    return TrainResult(weights=weights, num_examples=12, train_loss=0.7)


def test_client_filters_clip_and_noise_what_leaves_the_site():
    base = _model()
    trained = {"w": torch.full((D,), 0.01), "bn.num_batches_tracked": torch.tensor(50)}  # norm 4.47
    hook = activate({"aggregator": "dp_fedavg"}, observers=False).hook
    settings = hook.fedplug_aggregator_round_settings(round_number=1, config=_config(
        "dp_fedavg", clipping="client", clip_norm=0.5))
    clipped = apply_update_filter(_train_result(trained), base, TrainSettings(round_number=1, extra=settings))
    assert l2_norm(delta_of(clipped.weights, base)) == pytest.approx(0.5, rel=1e-6)
    assert int(clipped.weights["bn.num_batches_tracked"]) == 7
    # local DP: ldp_fedavg asks every client for dp_local; the noise std is z * clip on every coordinate
    hook = activate({"aggregator": "ldp_fedavg"}, observers=False).hook
    cfg = {"name": "ldp_fedavg", "clip_norm": 0.5, "noise_multiplier": 2.0, "noise_seed": 11}
    settings = hook.fedplug_aggregator_round_settings(round_number=3, config=cfg)
    noised = apply_update_filter(_train_result({"w": torch.zeros(D), "bn.num_batches_tracked": torch.tensor(9)}),
                                 base, TrainSettings(round_number=3, extra=settings))
    assert abs(float(noised.weights["w"].double().std()) / (2.0 * 0.5) - 1) < 5 / math.sqrt(2 * D)
    mech = hook.fedplug_aggregator_privacy(round_number=3, config=cfg)
    assert (mech.kind, mech.noise_multiplier, mech.sample_rate) == ("local", 2.0, 1.0)
    # no filter asked for: the result is untouched
    same = _train_result(trained)
    assert apply_update_filter(same, base, TrainSettings(round_number=1)) is same


def test_a_filter_the_client_cannot_load_fails_the_round_with_its_name():
    from fedplug.client import HookFailed

    with pytest.raises(HookFailed, match="update filter 'dp_nope'"):
        apply_update_filter(_train_result(_model(4)), _model(4),
                            TrainSettings(round_number=1, extra={"update_filter": {"name": "dp_nope"}}))
    with pytest.raises(HookFailed, match="dp_clip .*raised ValueError.*clip_norm a finite number > 0"):
        apply_update_filter(_train_result(_model(4)), _model(4),
                            TrainSettings(round_number=1, extra={"update_filter": {"name": "dp_clip"}}))
