"""The codec contract: ``fedplug_encode_update`` and ``fedplug_decode_update``.

Subclass :class:`CodecContract` and parametrize it with your codec's name::

    @pytest.mark.parametrize("codec_name", ["my_codec"])
    class TestMyCodec(CodecContract):
        lossless = False          # True: the suite requires bit-exact round trips

A client encodes its trained weights relative to the round's global model; the
server decodes the peer's bytes relative to the same model.  The suite calls
both hooks as the core does and checks that the decoded state has exactly the
global model's layout with integer buffers untouched, is closer to the trained
weights than the global model is (a lossless codec: equal to them), fits the
size bound, leaves its inputs alone, and that malformed, truncated, corrupted
or foreign bytes are refused with :class:`~fedplug.wire.WireError` — never
with another exception, and never by running code from the bytes.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

import pytest
import torch

from fedplug.codecs import ActiveCodec, size_bound
from fedplug.testing.loading import check_config_file, default_config, plugin_manager
from fedplug.wire import WireError, check_against_spec, spec_of


def _reference() -> dict[str, torch.Tensor]:
    """A detector-like global model: conv and linear weights, BatchNorm buffers, an integer counter."""
    g = torch.Generator().manual_seed(7)
    return {
        "backbone.conv.weight": torch.randn(16, 3, 3, 3, generator=g) * 0.2,
        "backbone.bn.weight": torch.ones(16),
        "backbone.bn.bias": torch.zeros(16),
        "backbone.bn.running_mean": torch.randn(16, generator=g) * 0.1,
        "backbone.bn.running_var": torch.rand(16, generator=g) + 0.5,
        "backbone.bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
        "head.weight": torch.randn(8, 64, generator=g) * 0.05,
        "head.bias": torch.randn(8, generator=g) * 0.01,
    }


def _trained(reference: dict[str, torch.Tensor], scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """A round of "training": every floating tensor moved by noise of ``scale`` x its spread, counters advanced."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in reference.items():
        if t.is_floating_point():
            spread = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 1.0
            out[name] = t + torch.randn(t.shape, generator=g) * scale * spread
        else:
            out[name] = t + 5
    return out


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()) ** 0.5


class CodecContract:
    """Checks every codec must pass; see the module docstring for use."""

    lossless: ClassVar[bool] = False
    corruptions: ClassVar[int] = 40  # single-byte corruptions of a valid encoding tried per check

    # -- fixtures a subclass provides or overrides -------------------------

    @pytest.fixture
    def codec_name(self) -> str:
        pytest.fail('parametrize the suite with your codec\'s name: @pytest.mark.parametrize("codec_name", ["<name>"])')

    @pytest.fixture
    def codec_plugin(self) -> object | None:
        """``None``: load the codec by name from its entry point; else this object is the plugin."""
        return None

    @pytest.fixture
    def codec_config(self, codec_name: str) -> dict[str, Any]:
        return default_config("codec", codec_name)

    @pytest.fixture
    def codec_hook(self, codec_name: str, codec_plugin: object | None):
        return plugin_manager("codec", codec_name, codec_plugin).hook

    @pytest.fixture
    def reference(self) -> dict[str, torch.Tensor]:
        return _reference()

    @pytest.fixture
    def encode(self, codec_hook, codec_config):
        def call(weights, reference, state=None) -> bytes:
            data = codec_hook.fedplug_encode_update(weights=weights, reference=reference, config=dict(codec_config),
                                                    state={} if state is None else state)
            assert isinstance(data, (bytes, bytearray, memoryview)), (
                f"fedplug_encode_update returned {type(data).__name__}; it must return bytes")
            return bytes(data)

        return call

    @pytest.fixture
    def decode(self, codec_hook, codec_config):
        def call(data, reference):
            return codec_hook.fedplug_decode_update(data=data, reference=reference, config=dict(codec_config),
                                                    max_bytes=size_bound(reference))

        return call

    # -- the config file ---------------------------------------------------

    def test_config_file_composes(self, codec_name):
        check_config_file("codec", codec_name)

    # -- round trips ---------------------------------------------------------

    def test_round_trip_has_the_global_layout(self, encode, decode, reference):
        weights = _trained(reference)
        state = decode(encode(weights, reference), reference)
        assert isinstance(state, dict), f"fedplug_decode_update returned {type(state).__name__}, expected a dict"
        check_against_spec(state, spec_of(reference))  # names, shapes, dtypes exactly; finite
        for name, t in reference.items():
            if not t.is_floating_point():
                assert torch.equal(state[name], weights[name]), f"integer buffer {name} must travel exactly"

    def test_decoded_update_is_closer_to_the_trained_weights_than_the_global_model(self, encode, decode,
                                                                                    reference):
        weights = _trained(reference)
        state = decode(encode(weights, reference), reference)
        if self.lossless:
            for name in reference:
                assert torch.equal(state[name], weights[name]), f"a lossless codec changed {name}"
            return
        error, moved = _distance(state, weights), _distance(reference, weights)
        assert error < moved, (f"the decoded update is {error:.4g} from the trained weights, the global model "
                               f"only {moved:.4g}: sending nothing would be better")

    def test_unchanged_weights_stay_close(self, encode, decode, reference):
        state = decode(encode({k: v.clone() for k, v in reference.items()}, reference), reference)
        for name, t in reference.items():
            if t.is_floating_point():
                assert torch.allclose(state[name], t, rtol=1e-2, atol=1e-6), f"{name} moved though nobody trained it"

    def test_encoding_fits_the_size_bound(self, encode, reference):
        data = encode(_trained(reference), reference)
        assert len(data) <= size_bound(reference), (
            f"{len(data)} bytes; the server refuses updates over {size_bound(reference)} bytes")

    def test_inputs_are_not_modified(self, encode, decode, reference):
        weights = _trained(reference)
        before_w = {k: v.clone() for k, v in weights.items()}
        before_r = {k: v.clone() for k, v in reference.items()}
        decode(encode(weights, reference), reference)
        for name in reference:
            assert torch.equal(weights[name], before_w[name]), f"encode modified the trained tensor {name}"
            assert torch.equal(reference[name], before_r[name]), f"encode or decode modified the global tensor {name}"

    def test_several_rounds_with_one_state(self, encode, decode, reference):
        # the client keeps one state dict across rounds (e.g. for error feedback)
        state: dict = {}
        current = reference
        for rnd in range(3):
            weights = _trained(current, seed=rnd + 10)
            decoded = decode(encode(weights, current, state), current)
            check_against_spec(decoded, spec_of(reference))
            current = decoded

    def test_works_through_the_core(self, codec_hook, codec_config, codec_name, reference):
        codec = ActiveCodec(dict(codec_config), codec_hook, f"codec {codec_name!r}")
        codec.check(reference)  # what the server does at start-up

    # -- hostile bytes -------------------------------------------------------

    @staticmethod
    def _refused(decode, data, reference, what: str) -> None:
        """Refused by the codec (WireError), or decoded into something the core's layout check refuses."""
        try:
            state = decode(data, reference)
        except WireError:
            return
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"{what}: fedplug_decode_update raised {type(exc).__name__} ({exc}); "
                        "malformed peer bytes must raise fedplug.wire.WireError")
        try:
            check_against_spec(state, spec_of(reference))
        except WireError:
            return
        pytest.fail(f"{what}: fedplug_decode_update accepted them and returned a state of the model's layout")

    def test_garbage_is_refused(self, decode, reference):
        rng = random.Random(0)
        for what, data in [("empty bytes", b""), ("8 zero bytes", b"\0" * 8),
                           ("a pickle", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N."),
                           ("4 KiB of random bytes", bytes(rng.getrandbits(8) for _ in range(4096)))]:
            self._refused(decode, data, reference, what)

    def test_truncated_and_extended_encodings_are_refused(self, encode, decode, reference):
        data = encode(_trained(reference), reference)
        for cut in (1, len(data) // 2, len(data) - 1):
            self._refused(decode, data[:cut], reference, f"the first {cut} of {len(data)} bytes")
        self._refused(decode, data + b"\0" * 16, reference, "a valid encoding followed by 16 more bytes")

    def test_another_models_encoding_is_refused(self, encode, decode, reference):
        other = {k: v for k, v in reference.items() if not k.startswith("head.")}
        other["head.weight"] = torch.zeros(4, 64)
        other["head.bias"] = torch.zeros(4)
        self._refused(decode, encode(_trained(other), other), reference, "an update of a model with another head")

    def test_corrupted_bytes_raise_only_wire_errors(self, encode, decode, reference):
        data = bytearray(encode(_trained(reference), reference))
        rng = random.Random(1)
        for _ in range(self.corruptions):
            bad = bytearray(data)
            i = rng.randrange(len(bad))
            bad[i] ^= 1 << rng.randrange(8)
            try:
                state = decode(bytes(bad), reference)
            except WireError:
                continue
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"flipping a bit of byte {i}: fedplug_decode_update raised {type(exc).__name__} "
                            f"({exc}); malformed peer bytes must raise fedplug.wire.WireError")
            # a flip inside the values may decode: the result must still have the model's layout
            try:
                check_against_spec(state, spec_of(reference))
            except WireError:
                pass  # e.g. a NaN: the core refuses it before any aggregator sees it
