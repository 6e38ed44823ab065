"""Update codecs (the ``codec`` role): each built-in's contract, its documented error bound, hostile bytes, the
core's checks, and a federation with each codec over real sockets.

The bounds asserted here are the ones docs/protocol.md ("Update codecs") and the
codecs' docstrings promise: fp16 ``2**-11`` relative, bf16 ``2**-8`` relative,
int8 ``max|delta| / 254`` per tensor, topk exact on the entries it keeps and the
rest carried over by error feedback, zstd bit for bit.
"""

from __future__ import annotations

import asyncio
import math
import sys

import pytest
import torch

from fedplug import plugins
from fedplug.codecs import ActiveCodec, CodecError, open_codec, size_bound
from fedplug.plugins import PluginError
from fedplug.testing import CodecContract
from fedplug.testing.codec import _reference, _trained
from fedplug.wire import WireError, encode_state

pytest_plugins = ["fedplug.testing.plugin"]

torch.set_num_threads(1)

LOSSLESS = {"none", "zstd"}
BUILTIN = sorted(n for n, c in plugins.discover("codec").items() if any(i.package == "fedplug" for i, _ in c))


def test_every_documented_codec_is_installed():
    assert {"none", "fp16", "bf16", "int8", "topk", "zstd"} <= set(BUILTIN)


@pytest.mark.parametrize("codec_name", [n for n in BUILTIN if n in LOSSLESS])
class TestLosslessCodecs(CodecContract):
    lossless = True


@pytest.mark.parametrize("codec_name", [n for n in BUILTIN if n not in LOSSLESS])
class TestLossyCodecs(CodecContract):
    pass


@pytest.mark.parametrize("codec_name", ["topk"])
class TestTopkWithoutErrorFeedback(CodecContract):
    @pytest.fixture
    def codec_config(self):
        return {"name": "topk", "density": 0.05, "error_feedback": False}


@pytest.mark.parametrize("codec_name", ["zstd"])
class TestZstdOfTheWeightsThemselves(CodecContract):
    lossless = True

    @pytest.fixture
    def codec_config(self):
        return {"name": "zstd", "level": 1, "relative": False}


# -- documented error bounds ----------------------------------------------------------------------------------


def _round_trip(name: str, weights, reference, **settings):
    codec = open_codec({"name": name, **settings})
    data = codec.encode(weights, reference)
    return codec.decode(data, reference), data


def _big_reference():
    g = torch.Generator().manual_seed(3)
    return {"w": torch.randn(300, 200, generator=g), "b": torch.randn(200, generator=g) * 1e-3,
            "tiny": torch.full((50,), 1e-6), "n": torch.tensor(7)}


def test_fp16_error_is_within_its_rounding_and_halves_the_bytes():
    ref = _big_reference()
    weights = _trained(ref)
    state, data = _round_trip("fp16", weights, ref)
    for name, w in weights.items():
        if w.is_floating_point():
            err = (state[name] - w).abs()
            assert bool((err <= 2 ** -11 * w.abs() + 2 ** -25).all()), name
    raw = len(encode_state(weights))
    assert len(data) < 0.52 * raw


def test_bf16_error_is_within_its_rounding():
    ref = _big_reference()
    weights = _trained(ref)
    state, _ = _round_trip("bf16", weights, ref)
    for name, w in weights.items():
        if w.is_floating_point():
            assert bool(((state[name] - w).abs() <= 2 ** -8 * w.abs()).all()), name


def test_fp16_refuses_values_beyond_its_range_and_names_bf16():
    ref = {"w": torch.zeros(4)}
    with pytest.raises(CodecError, match="float16's range.*codec=bf16"):
        open_codec("fp16").encode({"w": torch.tensor([1.0, 7e4, 0.0, 0.0])}, ref)
    # bf16 has float32's range
    state, _ = _round_trip("bf16", {"w": torch.tensor([1.0, 7e4, 0.0, 0.0])}, ref)
    assert abs(float(state["w"][1]) - 7e4) <= 2 ** -8 * 7e4


def test_int8_error_is_at_most_max_delta_over_254_per_tensor():
    ref = _big_reference()
    weights = _trained(ref, scale=0.2)
    state, data = _round_trip("int8", weights, ref)
    for name, w in weights.items():
        if w.is_floating_point():
            delta = (w - ref[name]).abs().max()
            assert float((state[name] - w).abs().max()) <= float(delta) / 254 * (1 + 1e-4) + 1e-7, name
        else:
            assert torch.equal(state[name], w)
    assert len(data) < 0.27 * len(encode_state(weights))


def test_topk_keeps_the_largest_entries_exactly_and_drops_the_rest():
    ref = _big_reference()
    weights = _trained(ref, scale=0.3)
    state, data = _round_trip("topk", weights, ref, density=0.05, error_feedback=False)
    delta = (weights["w"] - ref["w"]).reshape(-1)
    k = math.ceil(0.05 * delta.numel())
    top = set(delta.abs().topk(k).indices.tolist())
    got = (state["w"] - ref["w"]).reshape(-1)
    sent = got.nonzero().reshape(-1).tolist()
    assert set(sent) == top
    assert torch.allclose(got[sent], delta[sent], atol=1e-6)
    threshold = float(delta.abs().topk(k).values.min())
    assert float((state["w"] - weights["w"]).abs().max()) <= threshold + 1e-6  # the documented bound
    assert len(data) < 0.11 * len(encode_state(weights))  # 8 bytes per kept entry, 5 % kept


def test_topk_error_feedback_sends_what_it_left_out_later():
    ref = {"w": torch.zeros(1000)}
    codec = open_codec({"name": "topk", "density": 0.01})
    target = torch.linspace(0.001, 1.0, 1000)  # one update the client would like to send
    first = codec.decode(codec.encode({"w": target}, ref), ref)["w"]
    assert int((first != 0).sum()) == 10
    # next round nothing new: the residual alone goes out, largest first
    second = codec.decode(codec.encode({"w": ref["w"].clone()}, ref), ref)["w"]
    assert int((second != 0).sum()) == 10 and not bool(((first != 0) & (second != 0)).any())
    assert float(second.abs().max()) < float(first[first != 0].abs().min()) + 1e-6
    residual = codec.state["residual"]["w"]
    assert torch.allclose(first + second + residual, target, atol=1e-6)  # nothing is lost, only late


def test_zstd_is_exact_and_small_for_a_small_update():
    ref = _big_reference()
    weights = {k: (v + 1e-3 * v.abs().clamp(min=1e-3) if v.is_floating_point() else v) for k, v in ref.items()}
    state, data = _round_trip("zstd", weights, ref)
    assert all(torch.equal(state[k], weights[k]) for k in ref)
    assert len(data) < 0.75 * len(encode_state(weights))


# -- settings and installation --------------------------------------------------------------------------------


@pytest.mark.parametrize("config, key", [
    ({"name": "topk", "density": 0.5}, "codec.density"),
    ({"name": "topk", "density": 0}, "codec.density"),
    ({"name": "topk", "density": "much"}, "codec.density"),
    ({"name": "topk", "error_feedback": "yes"}, "codec.error_feedback"),
    ({"name": "zstd", "level": 0}, "codec.level"),
    ({"name": "zstd", "relative": 1}, "codec.relative"),
])
def test_bad_settings_stop_at_open_naming_the_key(config, key):
    with pytest.raises(CodecError, match=key.replace(".", r"\.")):
        open_codec(config)


def test_an_unknown_codec_lists_the_installed_ones():
    with pytest.raises(PluginError, match=r"codec 'fp17' is not available.*fp16.*Did you mean 'fp16'.*codec=<name>"):
        open_codec("fp17")


def test_a_config_without_a_name_is_refused():
    with pytest.raises(CodecError, match="must be an object with a name"):
        open_codec({"density": 0.1})


def test_zstd_without_the_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # import zstandard now raises ImportError
    with pytest.raises(CodecError, match=r"zstandard package.*pip install 'fedplug\[codecs\]'"):
        open_codec("zstd")


# -- the core's checks around any codec -----------------------------------------------------------------------


class _Liar:
    """A codec that answers with the wrong things, to check what the core does about it."""

    def __init__(self, encoded=b"x", decoded=None, raises=None):
        self.encoded, self.decoded, self.raises = encoded, decoded, raises

    def fedplug_encode_update(self, weights, reference, config, state):
        return self.encoded

    def fedplug_decode_update(self, data, reference, config, max_bytes):
        if self.raises is not None:
            raise self.raises
        return self.decoded


def _liar(**kwargs) -> ActiveCodec:
    class Hook:
        def __init__(self, impl):
            self.fedplug_encode_update = impl.fedplug_encode_update
            self.fedplug_decode_update = impl.fedplug_decode_update

    return ActiveCodec({"name": "liar"}, Hook(_Liar(**kwargs)), "codec 'liar' (from pkg 1.0)")


def test_the_core_refuses_an_encoding_over_the_upload_limit():
    ref = {"w": torch.zeros(10)}
    with pytest.raises(CodecError, match=r"codec 'liar'.*over the limit"):
        _liar(encoded=b"\0" * (size_bound(ref) + 1)).encode(ref, ref)
    with pytest.raises(CodecError, match="returned str.*expected bytes"):
        _liar(encoded="text").encode(ref, ref)


def test_the_core_refuses_oversized_peer_bytes_before_the_codec_sees_them():
    ref = {"w": torch.zeros(10)}
    with pytest.raises(CodecError, match="over the limit"):
        _liar(raises=AssertionError("must not be called")).decode(b"\0" * (size_bound(ref) + 1), ref)


def test_the_core_checks_what_a_codec_decodes():
    ref = {"w": torch.zeros(3), "n": torch.tensor(1)}
    with pytest.raises(WireError, match="dtype"):
        _liar(decoded={"w": torch.zeros(3, dtype=torch.float64), "n": torch.tensor(1)}).decode(b"x", ref)
    with pytest.raises(WireError, match="NaN"):
        _liar(decoded={"w": torch.tensor([0.0, float("nan"), 0.0]), "n": torch.tensor(1)}).decode(b"x", ref)
    with pytest.raises(WireError, match="missing"):
        _liar(decoded={"w": torch.zeros(3)}).decode(b"x", ref)
    with pytest.raises(CodecError, match="expected a dict of tensors"):
        _liar(decoded=[1, 2]).decode(b"x", ref)
    # a codec bug is a refused update naming the codec, not a server crash
    with pytest.raises(CodecError, match=r"codec 'liar' \(from pkg 1.0\) raised IndexError"):
        _liar(raises=IndexError("boom")).decode(b"x", ref)


# -- hostile bytes aimed at one codec's format ----------------------------------------------------------------


def test_zstd_refuses_frames_that_lie_about_their_size():
    import zstandard

    ref = {"w": torch.zeros(256)}
    codec = open_codec("zstd")
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (1024 * 1024 * 64))  # 64 MiB of zeros in a few kB
    with pytest.raises(CodecError, match=r"declares 67108864 bytes.*exactly 1024"):
        codec.decode(bomb, ref)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 1024)
    with pytest.raises(CodecError, match="declares no content size"):
        codec.decode(unsized, ref)
    good = codec.encode({"w": torch.ones(256)}, ref)
    with pytest.raises(CodecError, match="follow the zstd frame"):
        codec.decode(good + good, ref)


def _container(parts):
    from safetensors.torch import save

    return save(parts)


def test_topk_refuses_indices_out_of_range_repeated_or_unsorted():
    ref = {"w": torch.zeros(10)}
    codec = open_codec({"name": "topk", "density": 0.2})
    for index, why in ([[3, 10], "within"], [[4, 4], "strictly"], [[5, 2], "strictly"], [[-1, 2], "within"]):
        data = _container({"i/w": torch.tensor(index, dtype=torch.int32), "v/w": torch.ones(2)})
        with pytest.raises(CodecError, match=why):
            codec.decode(data, ref)
    too_many = _container({"i/w": torch.arange(3, dtype=torch.int32), "v/w": torch.ones(3)})
    with pytest.raises(CodecError, match=r"= 2 entries \(codec.density=0.2\)"):
        codec.decode(too_many, ref)
    wide = _container({"i/w": torch.tensor([1, 2]), "v/w": torch.ones(2)})  # int64 indices
    with pytest.raises(CodecError, match="expected torch.int32"):
        codec.decode(wide, ref)


def test_int8_refuses_bad_scales_and_parts():
    ref = {"w": torch.zeros(4)}
    codec = open_codec("int8")
    for scale in (float("nan"), -1.0, float("inf")):
        data = _container({"q/w": torch.ones(4, dtype=torch.int8), "s/w": torch.tensor(scale)})
        with pytest.raises(CodecError, match="finite scale"):
            codec.decode(data, ref)
    data = _container({"q/w": torch.ones(4, dtype=torch.int16), "s/w": torch.tensor(1.0)})
    with pytest.raises(CodecError, match="expected torch.int8"):
        codec.decode(data, ref)
    data = _container({"q/w": torch.ones(4, dtype=torch.int8), "s/w": torch.tensor(1.0), "x/evil": torch.ones(1)})
    with pytest.raises(CodecError, match="unexpected"):
        codec.decode(data, ref)


def test_plain_safetensors_sent_to_a_lossy_codec_is_refused_with_the_reason():
    ref = {"w": torch.zeros(4)}
    with pytest.raises(CodecError, match=r"init\.codec"):
        open_codec("int8").decode(encode_state(ref), ref)


# -- a federation with each codec -----------------------------------------------------------------------------


class _Detector:
    """Trains by adding 0.01 to every floating tensor; evaluation scores nothing."""

    def __init__(self, values: int = 4000):
        self.values = values

    def _model(self, num_classes):
        from torch import nn

        torch.manual_seed(0)
        model = nn.Module()
        model.head = nn.Linear(4, num_classes + 1)
        model.bulk = nn.Parameter(torch.randn(self.values) * 0.1)
        return model

    from fedplug.hooks import hookimpl as _impl

    @_impl
    def fedplug_build_model(self, config, class_names):
        return self._model(len(class_names))

    @_impl
    def fedplug_train_round(self, model, dataset, settings, global_weights):
        from fedplug.types import TrainResult

        return TrainResult(weights={k: v + 0.01 for k, v in global_weights.items()},
                           num_examples=len(dataset), train_loss=0.1)

    @_impl
    def fedplug_evaluate(self, model, dataset, settings):
        from fedplug.types import DetectionStats, EvalResult

        return EvalResult(num_examples=len(dataset), loss=0.1, map50=0.5, recall=0.5,
                          stats=DetectionStats.empty(3))


async def _federation(tmp_path, codec: str):
    from fedplug.client import FederationClient
    from fedplug.data import generate_synthetic_federation
    from fedplug.server import FederationServer
    from scripted import detector_plugins, compose_cfg

    detector = _Detector()
    cfg = compose_cfg(f"codec={codec}", "run.rounds=2", "run.min_clients=2", "run.clients_per_round=2",
                      "server.chunk_kb=8")
    server = FederationServer(cfg, detector_plugins(detector, True), ("car", "person", "sign"), tmp_path / "run",
                              echo=lambda *a: None)
    port = await server.start()
    (folder,) = generate_synthetic_federation(tmp_path / "data", num_clients=1, train_per_client=2,
                                              test_per_client=1, image_size=64, seed=0)
    clients, tasks = [], []
    for i, version in enumerate((2, 1)):  # a chunked (v2) and an inline (v1) client
        c = FederationClient(f"http://127.0.0.1:{port}", f"site{i}", {"format": "voc", "path": str(folder)},
                             echo=lambda *a: None, protocol_version=version)
        c.activate_plugins = lambda *a, **k: detector_plugins(detector, False)
        clients.append(c)
        tasks.append(asyncio.get_running_loop().create_task(c.run()))
    try:
        status = await asyncio.wait_for(server.run_federation(), 90)
    finally:
        await server.stop()
    codes = [await asyncio.wait_for(t, 30) for t in tasks]
    return status, codes, server, clients


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["none", "fp16", "bf16", "int8", "topk", "zstd"])
def test_a_federation_runs_with_each_codec(tmp_path, codec):
    from fedplug.outputs import read_events

    status, codes, server, clients = asyncio.run(_federation(tmp_path, codec))
    assert status == 0 and codes == [0, 0]
    assert [c.codec.name for c in clients] == [codec, codec]  # init.codec reached both clients
    assert [r.participants for r in server.history] == [("site0", "site1")] * 2
    start = _Detector()._model(3).state_dict()
    moved = server.global_weights["bulk"] - start["bulk"]
    if codec in LOSSLESS:
        assert torch.equal(server.global_weights["bulk"], start["bulk"] + 0.01 + 0.01)
    elif codec == "topk":  # 1 % of the entries per round, error feedback sends the rest later
        assert 0 < int((moved != 0).sum()) <= 2 * math.ceil(0.01 * 4000) * 2
    else:
        assert torch.allclose(moved, torch.full_like(moved, 0.02), atol=2e-3)
    sizes = [e["bytes"] for e in read_events(tmp_path / "run" / "events.jsonl") if e["event"] == "client_update"]
    raw = 4 * 4000
    assert len(sizes) == 4
    limit = {"none": 1.1, "zstd": 1.1, "fp16": 0.6, "bf16": 0.6, "int8": 0.35, "topk": 0.1}[codec]
    assert max(sizes) < limit * raw, sizes


# -- the contract suite catches the defects it exists for -------------------------------------------------------


class _Broken:
    """Plain safetensors with one defect switched on."""

    def __init__(self, defect: str):
        self.defect = defect

    def encode(self, weights, reference, state=None):
        return encode_state(weights)

    def decode(self, data, reference):
        from fedplug.wire import decode_state

        if self.defect == "crashes" and len(data) < 64:
            raise IndexError("header too short")
        state = decode_state(data)
        if self.defect == "counts_reset":
            state = {k: (torch.zeros_like(v) if not v.is_floating_point() else v) for k, v in state.items()}
        if self.defect == "sends_nothing":
            state = {k: v.clone() for k, v in reference.items()}
        return state


@pytest.mark.parametrize("defect, check", [
    ("crashes", "test_garbage_is_refused"),
    ("counts_reset", "test_round_trip_has_the_global_layout"),
    ("sends_nothing", "test_decoded_update_is_closer_to_the_trained_weights_than_the_global_model"),
])
def test_the_codec_suite_fails_a_codec_with_that_defect(defect, check):
    broken, suite = _Broken(defect), CodecContract()
    method = getattr(suite, check)
    kwargs = {"encode": broken.encode, "decode": broken.decode, "reference": _reference()}
    names = method.__code__.co_varnames[1:method.__code__.co_argcount]
    with pytest.raises(BaseException) as info:
        method(**{n: kwargs[n] for n in names})
    assert isinstance(info.value, (AssertionError, pytest.fail.Exception)), repr(info.value)
    # and the same check passes for the sound codec
    sound = _Broken("none")
    method(**{n: {"encode": sound.encode, "decode": sound.decode, "reference": _reference()}[n] for n in names})
