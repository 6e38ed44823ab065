"""Secure aggregation in a real run (secagg.enabled=true): the server sees masked vectors and the sum only.

The server runs in-process with real :class:`FederationClient` peers over real
sockets; each client's toy detector moves the weights by its own known delta,
so the FedAvg result is known exactly, and spies record every masked input the
server receives and every update its aggregator is given.
"""

import asyncio

import numpy as np
import pytest
import torch
from torch import nn

from fedplug.client import FederationClient
from fedplug.collect import UpdateStream
from fedplug.config import ConfigError, validate
from fedplug.hooks import hookimpl
from fedplug.outputs import read_events
from fedplug.secagg import run as secagg_run
from fedplug.secagg.masking import quantize
from fedplug.secagg.protocol import SecAggError
from fedplug.server import FederationServer
from fedplug.types import DetectionStats, EvalResult, TrainResult
from scripted import detector_plugins, compose_cfg

CLASSES = ("car", "person", "sign")
VALUES = 5000


class Toy(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.head = nn.Linear(4, num_classes + 1)
        self.bulk = nn.Parameter(torch.zeros(VALUES))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # not aggregated: kept as it is


class DeltaDetector:
    """Training adds this client's ``delta`` (times a fixed random direction) to every float tensor."""

    def __init__(self, delta: float, fail: bool = False):
        self.delta, self.fail = delta, fail

    @hookimpl
    def fedplug_build_model(self, config, class_names):
        torch.manual_seed(0)
        return Toy(len(class_names))

    @hookimpl
    def fedplug_train_round(self, model, dataset, settings, global_weights, state):
        if self.fail:
            raise RuntimeError("this site's training crashed")
        out = {}
        for k, v in global_weights.items():
            if v.is_floating_point():
                g = torch.Generator().manual_seed(len(k))
                out[k] = v + self.delta * torch.randn(v.shape, generator=g)
            else:
                out[k] = v + 7  # an integer buffer a client changed: secure aggregation keeps the global one
        return TrainResult(weights=out, num_examples=len(dataset), train_loss=0.1)

    @hookimpl
    def fedplug_evaluate(self, model, dataset, settings):
        return EvalResult(num_examples=len(dataset), loss=0.1, map50=0.5, recall=0.5,
                          stats=DetectionStats.empty(len(CLASSES)))


def _folders(tmp_path, n):
    from fedplug.data import generate_synthetic_federation

    return generate_synthetic_federation(tmp_path / "data", num_clients=n, train_per_client=2 + 0,
                                         test_per_client=1, image_size=64, seed=0)


async def _federation(tmp_path, detectors: dict, *overrides, timeout=120, before=None):
    n = len(detectors)
    cfg = compose_cfg("secagg.enabled=true", f"run.num_clients={n}", f"run.min_clients={n}",
                      f"run.clients_per_round={n}", "secagg.timeout_s=30", "server.update_timeout_s=30",
                      *overrides)
    lines = []
    server = FederationServer(cfg, detector_plugins(DeltaDetector(0.0), server=True, name="delta"), CLASSES, tmp_path / "run",
                              echo=lines.append)
    start = {k: v.clone() for k, v in server.global_weights.items()}
    port = await server.start()
    made, tasks = {}, {}
    for (cid, detector), folder in zip(detectors.items(), _folders(tmp_path, n)):
        made[cid] = FederationClient(f"http://127.0.0.1:{port}", cid, {"format": "voc", "path": str(folder)},
                                     echo=lambda *a: None)
        made[cid].activate_plugins = lambda *a, _d=detector, **k: detector_plugins(_d, name="delta")
        if before is not None:
            before(cid, made[cid])
        tasks[cid] = asyncio.get_running_loop().create_task(made[cid].run())
    try:
        status = await asyncio.wait_for(server.run_federation(), timeout)
    finally:
        await server.stop()
    codes = {cid: await asyncio.wait_for(t, 30) for cid, t in tasks.items()}
    return status, codes, server, start, lines


def _fedavg(start, detectors: dict, who):
    """What plain FedAvg gives for the clients ``who`` (equal example counts)."""
    out = {}
    for k, v in start.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        g = torch.Generator().manual_seed(len(k))
        direction = torch.randn(v.shape, generator=g)
        out[k] = v + direction * float(np.mean([detectors[c].delta for c in who]))
    return out


def _spy(monkeypatch):
    seen = {"masked": [], "aggregated": []}
    real_take, real_put = secagg_run.SecureRound.take_masked, UpdateStream.put

    def take_masked(self, cid, source, train_size=0):
        from safetensors.numpy import load, load_file

        tensors = load_file(str(source)) if not isinstance(source, (bytes, bytearray)) else load(bytes(source))
        seen["masked"].append((cid, tensors[secagg_run.MASKED_TENSOR].copy()))
        return real_take(self, cid, source, train_size)

    def put(self, update):
        seen["aggregated"].append((update.client_id, update.num_examples))
        return real_put(self, update)

    monkeypatch.setattr(secagg_run.SecureRound, "take_masked", take_masked)
    monkeypatch.setattr(UpdateStream, "put", put)
    return seen


def test_the_result_is_fedavg_and_the_server_only_sees_masked_vectors_and_the_mean(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    detectors = {"site-a": DeltaDetector(0.01), "site-b": DeltaDetector(0.03), "site-c": DeltaDetector(-0.02)}
    status, codes, server, start, lines = asyncio.run(_federation(tmp_path, detectors, "run.rounds=1"))
    assert status == 0 and set(codes.values()) == {0}, "\n".join(lines)
    expected = _fedavg(start, detectors, detectors)
    for k, v in expected.items():
        # the quantisation error: 2^-25 per value, per client
        assert torch.allclose(server.global_weights[k].double(), v.double(), atol=1e-6, rtol=0), k
    assert torch.equal(server.global_weights["steps"], start["steps"])
    # the aggregator was handed one update per round: the mean, under no client's name
    assert seen["aggregated"] == [("secagg", 3 * 2)]
    # each masked input the server held is uncorrelated with that client's true (quantised) input
    assert sorted(cid for cid, _ in seen["masked"]) == sorted(detectors)
    for cid, masked in seen["masked"]:
        trained = {k: v + detectors[cid].delta * torch.randn(v.shape, generator=torch.Generator().manual_seed(len(k)))
                   for k, v in start.items() if v.is_floating_point()}
        true = quantize(secagg_run.fedavg_input(trained, {k: start[k] for k in trained}, 2)).view(np.int64)
        got = masked.view(np.int64).astype(np.float64)
        r = np.corrcoef(got, true.astype(np.float64))[0, 1]
        assert abs(r) < 5 / np.sqrt(got.size), (cid, r)
        assert not np.array_equal(masked, true.view(np.uint64))
    events = read_events(tmp_path / "run" / "events.jsonl")
    names = [e["event"] for e in events]
    for event in ("secagg_setup", "secagg_keys", "secagg_peer_keys", "secagg_shares", "secagg_unmask",
                  "secagg_unmask_shares", "secagg_unmasked"):
        assert event in names, event
    assert names.index("secagg_shares") < names.index("request_update") < names.index("secagg_unmask")


def test_a_client_that_drops_after_its_masked_input_is_still_in_the_sum(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    detectors = {f"site-{i}": DeltaDetector(0.01 * (i + 1)) for i in range(4)}

    def gone_before_unmasking(cid, client):
        if cid == "site-3":
            def on_unmask(msg):
                raise SecAggError("this site went away")
            client.secure.on_unmask = on_unmask

    status, codes, server, start, lines = asyncio.run(_federation(tmp_path, detectors, "run.rounds=1",
                                                                   before=gone_before_unmasking))
    assert status == 0, "\n".join(lines)
    assert any("site-3 left the secure aggregation" in line for line in lines)
    expected = _fedavg(start, detectors, detectors)  # its self-mask came off with the others' shares
    assert torch.allclose(server.global_weights["bulk"].double(), expected["bulk"].double(), atol=1e-6, rtol=0)
    assert seen["aggregated"] == [("secagg", 4 * 2)]


def test_a_client_that_drops_before_its_masked_input_is_left_out_and_its_masks_removed(tmp_path, monkeypatch):
    detectors = {f"site-{i}": DeltaDetector(0.01 * (i + 1)) for i in range(4)}
    detectors["site-2"].fail = True  # it shared its keys, then never sends a masked input
    status, codes, server, start, lines = asyncio.run(_federation(tmp_path, detectors, "run.rounds=1",
                                                                   "server.quorum=0.5"))
    assert status == 0, "\n".join(lines)
    survivors = ["site-0", "site-1", "site-3"]
    assert list(server.history[0].participants) == survivors
    expected = _fedavg(start, detectors, survivors)  # its pair masks in the others' inputs were rebuilt and removed
    assert torch.allclose(server.global_weights["bulk"].double(), expected["bulk"].double(), atol=1e-6, rtol=0)


def test_a_forged_masked_input_is_refused_and_the_round_survives(tmp_path, monkeypatch):
    detectors = {f"site-{i}": DeltaDetector(0.01) for i in range(4)}

    def forge(cid, client):
        if cid == "site-1":
            def masked_upload(secagg, weights, global_weights, num_examples):
                from safetensors.numpy import save

                return save({"bulk": np.zeros(10, dtype=np.float32)})  # plain weights instead of a masked vector
            client.secure.masked_upload = masked_upload

    status, codes, server, start, lines = asyncio.run(_federation(tmp_path, detectors, "run.rounds=1",
                                                                   "server.quorum=0.5", before=forge))
    assert status == 0, "\n".join(lines)
    assert any("rejected masked update from site-1" in line and "names no session" in line for line in lines)
    assert "site-1" not in server.history[0].participants
    expected = _fedavg(start, detectors, ["site-0", "site-2", "site-3"])
    assert torch.allclose(server.global_weights["bulk"].double(), expected["bulk"].double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("override, words", [
    ("aggregator=fedmedian", "needs each client's update"),
    ("codec=fp16", "codec=none"),
    ("run.clients_per_round=2", "clients_per_round >= 3"),
    ("secagg.degree=3", "secagg.degree"),
    ("secagg.threshold=1", "secagg.threshold"),
])
def test_settings_that_cannot_be_secure_are_refused_at_start_up(override, words):
    cfg = compose_cfg("secagg.enabled=true", "run.num_clients=3", "run.min_clients=3", "run.clients_per_round=3",
                      override)
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate(cfg)


def test_the_servers_session_refuses_messages_that_do_not_fit_the_round():
    start = {"w": torch.zeros(8)}
    secure = secagg_run.SecureRound(1, ["a", "b", "c", "d"], start, {"degree": None, "threshold": None})
    clients = {cid: secagg_run.ClientSessions(cid) for cid in "abcd"}
    for cid, c in clients.items():
        secure.take_keys(cid, c.on_setup(secure.setup_for(cid)))
    shares = {cid: c.on_peer_keys(secure.peer_keys_for(cid)) for cid, c in clients.items()}
    with pytest.raises(SecAggError, match="not neighbours"):
        secure.take_shares("a", {"envelopes": {**shares["a"]["envelopes"], "mallory": b"x"}})
    with pytest.raises(SecAggError, match="threshold"):
        secure.take_shares("a", {"envelopes": dict(list(shares["a"]["envelopes"].items())[:1])})
    for cid in "abc":  # d shares nothing: it is out of the round from here on
        secure.take_shares(cid, shares[cid])
    with pytest.raises(SecAggError, match="not a safetensors file"):
        secure.take_masked("a", b"\x00" * 64)
    from safetensors.numpy import save

    this_session = {secagg_run.SESSION_KEY: secure.session}
    wrong = save({secagg_run.MASKED_TENSOR: np.zeros(3, dtype=np.uint64)}, metadata=this_session)
    with pytest.raises(SecAggError, match="uint64 of shape"):
        secure.take_masked("a", wrong)
    right_shape = np.zeros(secure.core.length, dtype=np.uint64)
    with pytest.raises(SecAggError, match="not expected"):
        secure.take_masked("d", save({secagg_run.MASKED_TENSOR: right_shape}, metadata=this_session))
    # a late masked input from an earlier attempt of the round: its masks would not cancel in this sum
    with pytest.raises(SecAggError, match="belongs to session 'feedfacefeedface'"):
        secure.take_masked("a", save({secagg_run.MASKED_TENSOR: right_shape},
                                     metadata={secagg_run.SESSION_KEY: "feedfacefeedface"}))
    with pytest.raises(SecAggError, match="names no session"):
        secure.take_masked("a", save({secagg_run.MASKED_TENSOR: right_shape}))
    for cid in "abc":
        secure.take_masked(cid, clients[cid].masked_upload(secure.envelopes_for(cid), {"w": torch.ones(8)}, start, 5),
                           train_size=5)
    assert secure.core.survivors == ["a", "b", "c"]
    with pytest.raises(SecAggError, match="not expected"):  # twice
        secure.take_masked("a", clients["a"].masked_upload(secure.envelopes_for("a"), {"w": torch.ones(8)}, start, 5))
    from fedplug import protocol as P
    from fedplug import schemas as S

    answers = {cid: S.parse(P.SECAGG_UNMASK_SHARES, clients[cid].on_unmask(secure.unmask_request())) for cid in "abc"}
    with pytest.raises(SecAggError, match="not a survivor"):
        secure.take_unmask("d", answers["a"])
    for cid in "abc":
        secure.take_unmask(cid, answers[cid])
    mean, count = secure.mean(start)
    assert count == 15 and torch.allclose(mean["w"], torch.ones(8), atol=1e-6)
    # a client that restarted holds no keys: it says so instead of answering
    with pytest.raises(SecAggError, match="holds no keys"):
        secagg_run.ClientSessions("a").on_unmask(secure.unmask_request())


def test_secagg_plus_with_a_sparse_neighbourhood_is_still_fedavg(tmp_path):
    detectors = {f"site-{i}": DeltaDetector(0.01 * (i - 2)) for i in range(6)}
    status, codes, server, start, lines = asyncio.run(_federation(tmp_path, detectors, "run.rounds=1",
                                                                   "secagg.degree=2"))
    assert status == 0, "\n".join(lines)
    assert any("threshold 2" in line for line in lines)
    expected = _fedavg(start, detectors, detectors)
    assert torch.allclose(server.global_weights["bulk"].double(), expected["bulk"].double(), atol=1e-6, rtol=0)


def test_with_three_clients_a_dropout_after_sharing_fails_the_round_before_any_share_is_asked(tmp_path):
    """Each survivor's self-mask needs 2 shares from surviving neighbours: with one gone, each has 1."""
    detectors = {f"site-{i}": DeltaDetector(0.01) for i in range(3)}
    detectors["site-2"].fail = True
    status, codes, server, start, lines = asyncio.run(_federation(
        tmp_path, detectors, "run.rounds=1", "server.quorum=0.5", "server.round_retries=0"))
    assert status == 1
    assert any("cannot unmask this round: only 1 surviving neighbour(s)" in line for line in lines), "\n".join(lines)
    events = read_events(tmp_path / "run" / "events.jsonl")
    assert not any(e["event"] == "secagg_unmask" for e in events)  # no share was revealed for nothing
    assert torch.equal(server.global_weights["bulk"], start["bulk"])  # the global model is untouched


def test_an_n_inside_the_masked_input_other_than_the_reported_train_size_fails_the_round(tmp_path):
    """The server cannot see n inside a masked input, but it sees the sum: Σ n must equal Σ train_size."""
    detectors = {f"site-{i}": DeltaDetector(0.01) for i in range(3)}

    def inflate(cid, client):
        if cid == "site-0":
            real = client.secure.masked_upload
            client.secure.masked_upload = lambda secagg, w, g, n: real(secagg, w, g, n * 1000)  # weight x1000

    status, codes, server, start, lines = asyncio.run(_federation(
        tmp_path, detectors, "run.rounds=1", "server.round_retries=0", before=inflate))
    assert status == 1
    assert any("the unmasked example count is 2004, but the survivors reported 6" in line for line in lines), \
        "\n".join(lines)
    assert torch.equal(server.global_weights["bulk"], start["bulk"])
