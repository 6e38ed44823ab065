"""Secure aggregation's crypto core (fedplug.secagg): shares, masks, the four rounds, dropouts.

A spy records everything the server-side code is handed; the tests show that
no individual update can be read from it (each masked input is uncorrelated
with every true update), that the unmasked result is plain FedAvg within the
quantisation error, and that clients dropping after or before their masked
input are recovered or excluded with the others' shares.
"""

import math

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag

from fedplug.secagg import keys as K
from fedplug.secagg import shamir
from fedplug.secagg.masking import dequantize, prg, quantize
from fedplug.secagg.protocol import (SecAggClient, SecAggError, SecAggServer, fedavg_from_sum, fedavg_input,
                                     input_length, neighbourhoods)
from fedplug.testing.data import perturbed, sample_state_dict
from fedplug.types import ClientUpdate
from fedplug_plugins.aggregators.fedavg import fedavg

FRAC = 24


class SpyServer(SecAggServer):
    """Records every value the server-side code receives."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen: list[tuple[str, object]] = []

    def receive_keys(self, message):
        self.seen.append(("keys", message))
        super().receive_keys(message)

    def receive_shares(self, sender, envelopes):
        self.seen.append(("shares", envelopes))
        super().receive_shares(sender, envelopes)

    def receive_masked_input(self, cid, masked):
        self.seen.append(("masked", np.array(masked, copy=True)))
        super().receive_masked_input(cid, masked)

    def receive_unmask(self, cid, shares):
        self.seen.append(("unmask", shares))
        super().receive_unmask(cid, shares)


def run_secagg(inputs: dict, threshold: int, degree=None, drop_before_masking=(), drop_before_unmask=(),
               server_cls=SpyServer):
    """Drive every round in memory; returns (unmasked sum, server)."""
    length = len(next(iter(inputs.values())))
    server = server_cls(list(inputs), length, threshold, degree=degree, frac_bits=FRAC, graph_seed=1)
    setup = server.setup()
    clients = {cid: SecAggClient(cid, setup) for cid in inputs}
    for c in clients.values():
        server.receive_keys(c.advertise_keys())
    for cid, c in clients.items():
        server.receive_shares(cid, c.share_keys(server.keys_for(cid)))
    for cid, c in clients.items():
        if cid in drop_before_masking:
            continue
        server.receive_masked_input(cid, c.masked_input(server.envelopes_for(cid), inputs[cid]))
    for cid, c in clients.items():
        if cid in drop_before_masking or cid in drop_before_unmask:
            continue
        server.receive_unmask(cid, c.unmask(server.survivors))
    return server.unmasked_sum(), server


def _inputs(n=5, length=4000, seed=0):
    g = np.random.default_rng(seed)
    return {f"site-{k}": g.normal(0, 0.1, length) * (k + 1) for k in range(n)}


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not():
    secret = bytes(range(32))
    shares = shamir.split(secret, 6, 3)
    for picked in ([0, 1, 2], [1, 3, 5], [5, 4, 0, 2]):
        assert shamir.combine([shares[i] for i in picked], 3) == secret
    with pytest.raises(ValueError, match="cannot reconstruct"):
        shamir.combine(shares[:2], 3)
    try:  # two shares of a degree-2 polynomial interpolate to a random field element, not the secret
        wrong = shamir.combine(shares[:2], 2)
    except ValueError:
        wrong = None
    assert wrong != secret


def test_key_agreement_and_envelopes():
    a, b = K.KeyPair(), K.KeyPair()
    assert K.agree(a.private, b.public, "mask", "s1") == K.agree(b.private, a.public, "mask", "s1")
    assert K.agree(a.private, b.public, "mask", "s1") != K.agree(a.private, b.public, "shares", "s1")
    key = K.agree(a.private, b.public, "shares", "s1")
    sealed = K.seal(key, b"share", b"a->b")
    assert K.open_sealed(key, sealed, b"a->b") == b"share"
    with pytest.raises(InvalidTag):
        K.open_sealed(key, sealed, b"c->b")  # an envelope cannot be redirected to another sender


def test_the_two_envelopes_of_a_pair_are_sealed_under_different_keys():
    """With one key both ways and the fixed nonce, the relaying server could XOR the two envelopes apart."""
    setup = {"session": "0123456789abcdef", "threshold": 2, "length": 4, "participants": ["u", "v", "w"],
             "neighbours": {"u": ["v", "w"], "v": ["u", "w"], "w": ["u", "v"]}}
    clients = {cid: SecAggClient(cid, setup) for cid in "uvw"}
    keys = {cid: (c.advertise_keys()["c_pk"], c.advertise_keys()["s_pk"]) for cid, c in clients.items()}
    sealed = {cid: c.share_keys(keys) for cid, c in clients.items()}
    u_to_v, v_to_u = sealed["u"]["v"], sealed["v"]["u"]
    assert len(u_to_v) == len(v_to_u)
    xor = bytes(a ^ b for a, b in zip(u_to_v, v_to_u))
    # under a shared keystream the XOR of the ciphertexts would equal the XOR of the plaintexts, whose first
    # two bytes (the share's x, 1 or 2) differ in at most two bits; under two keys it is noise
    u_key = K.agree(clients["u"].c.private, keys["v"][0], "shares/u->v", setup["session"])
    v_key = K.agree(clients["v"].c.private, keys["u"][0], "shares/v->u", setup["session"])
    assert u_key != v_key
    plain_u = K.open_sealed(u_key, u_to_v, b"u->v")
    plain_v = K.open_sealed(v_key, v_to_u, b"v->u")
    assert bytes(a ^ b for a, b in zip(plain_u, plain_v)) != xor[:len(plain_u)]
    with pytest.raises(InvalidTag):  # and neither opens under the other direction's key
        K.open_sealed(v_key, u_to_v, b"u->v")


def test_quantisation_round_trips_within_half_a_step_and_sums_wrap_exactly():
    x = np.array([-3.25, 0.0, 1e-9, 12345.678, -0.5])
    assert np.all(np.abs(dequantize(quantize(x, FRAC), FRAC) - x) <= 2.0 ** -(FRAC + 1))
    mask = prg(b"\x01" * 32, 5)
    assert np.allclose(dequantize(quantize(x, FRAC) + mask - mask, FRAC), x, atol=2.0 ** -FRAC)
    assert not np.array_equal(prg(b"\x01" * 32, 5), prg(b"\x02" * 32, 5))


def test_the_sum_is_exact_and_the_server_sees_nothing_individual():
    inputs = _inputs()
    total, server = run_secagg(inputs, threshold=3)
    assert np.allclose(total, sum(inputs.values()), atol=len(inputs) * 2.0 ** -FRAC)
    masked = [v for kind, v in server.seen if kind == "masked"]
    assert len(masked) == len(inputs)
    length = len(masked[0])
    for y in masked:
        seen = dequantize(y, FRAC)
        for x in inputs.values():
            corr = float(np.corrcoef(seen, x)[0, 1])
            assert abs(corr) < 5 / math.sqrt(length), corr  # indistinguishable from independent noise
        # every masked coordinate looks uniform over the ring, not like a small update
        assert np.median(np.abs(seen)) > 1e9
    # the only vector state the server keeps is the running sum: no input is stored
    assert not any(isinstance(v, np.ndarray) and v is not server.sum for v in vars(server).values()
                   if isinstance(v, np.ndarray) and v.shape == (length,) and v is not server.sum)


def test_secagg_fedavg_equals_plain_fedavg_within_the_quantisation_error():
    global_weights = sample_state_dict(0)
    sizes = {"a": 10, "b": 30, "c": 7, "d": 21}
    trained = {cid: perturbed(global_weights, seed=k) for k, cid in enumerate(sizes)}
    inputs = {cid: fedavg_input(trained[cid], global_weights, n) for cid, n in sizes.items()}
    assert len(inputs["a"]) == input_length(global_weights)
    total, _ = run_secagg(inputs, threshold=3)
    secure = fedavg_from_sum(total, global_weights)
    plain = fedavg(global_weights, [ClientUpdate(c, 1, trained[c], n, 0.0) for c, n in sizes.items()])
    for name, g in global_weights.items():
        if g.is_floating_point():
            # per coordinate: 4 roundings of at most 2^-25 each, divided by the total count
            assert torch.allclose(secure[name].double(), plain[name].double(), atol=1e-6, rtol=0), name
        else:
            assert torch.equal(secure[name], g)  # integer buffers do not go through SecAgg


def test_a_client_that_drops_after_its_masked_input_is_recovered_from_the_others_shares():
    inputs = _inputs(n=6)
    total, server = run_secagg(inputs, threshold=3, drop_before_unmask={"site-2"})
    assert "site-2" in server.survivors and "site-2" not in server.unmask_shares
    assert np.allclose(total, sum(inputs.values()), atol=6 * 2.0 ** -FRAC)


def test_a_client_that_drops_before_its_masked_input_is_excluded():
    inputs = _inputs(n=6)
    total, server = run_secagg(inputs, threshold=3, degree=4, drop_before_masking={"site-4"})
    expected = sum(v for cid, v in inputs.items() if cid != "site-4")
    assert np.allclose(total, expected, atol=6 * 2.0 ** -FRAC)
    # the survivors revealed site-4's mask key, never its self-mask seed, and nobody's both
    for kind, shares in server.seen:
        if kind == "unmask":
            assert shares.get("site-4", ("s",))[0] == "s"
            assert all(k == "b" for u, (k, _) in shares.items() if u != "site-4")


def test_too_many_dropouts_fail_clearly_instead_of_revealing_anything():
    inputs = _inputs(n=4, length=50)
    with pytest.raises(SecAggError, match="threshold"):
        run_secagg(inputs, threshold=3, drop_before_masking={"site-0", "site-1"})


def test_a_threshold_the_neighbourhoods_cannot_meet_is_refused():
    with pytest.raises(SecAggError, match="threshold must be between 2 and the neighbourhood size"):
        SecAggServer([f"c{k}" for k in range(8)], 10, threshold=5, degree=4)


def test_neighbourhoods_are_regular_and_symmetric():
    ids = [f"c{k}" for k in range(10)]
    graph = neighbourhoods(ids, 4, seed=3)
    assert all(len(v) == 4 for v in graph.values())
    assert all(c in graph[o] for c, vs in graph.items() for o in vs)
    assert neighbourhoods(ids[:4], 6) == {c: [o for o in ids[:4] if o != c] for c in ids[:4]}
    with pytest.raises(SecAggError, match="even"):
        neighbourhoods(ids, 3)


def test_the_secagg_benchmark_runs_and_agrees_with_fedavg(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_secagg.py"
    spec = importlib.util.spec_from_file_location("bench_secagg", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--params", "3000", "--clients", "4", "--out-dir", str(tmp_path)]) == 0
    text = (tmp_path / "secagg.txt").read_text()
    assert "4 clients" in text
    upload_ratio = float(text.split("upload ")[-1].split("x")[0])
    assert upload_ratio >= 2.0  # 8-byte ring elements for 4-byte floats, plus the key and share messages
    error = float(text.rsplit("max |SecAgg - FedAvg| = ", 1)[1].split()[0])
    assert error < 1e-6
