"""The wire format: safetensors round trips and the checks on peer bytes."""

import pickle

import pytest
import torch

from fedplug.wire import WireError, check_against_spec, decode_checked, decode_state, encode_state, spec_of


def _state():
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "bn.running_mean": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(7, dtype=torch.long),
        "half": torch.randn(5).half(),
    }


def test_round_trip_is_exact_for_params_and_integer_buffers():
    state = _state()
    back = decode_checked(encode_state(state), spec_of(state))
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype
        assert torch.equal(back[k], state[k])


def test_bytes_on_wire_are_close_to_raw_tensor_bytes():
    state = {"w": torch.randn(256, 1024)}
    raw = state["w"].numel() * 4
    assert len(encode_state(state)) < raw * 1.01  # the original's pickle+base64 was 1.33x


def test_tied_and_noncontiguous_tensors_are_encoded():
    w = torch.randn(4, 6)
    state = {"a": w, "b": w, "t": w.t()}
    back = decode_state(encode_state(state))
    assert torch.equal(back["a"], w) and torch.equal(back["b"], w) and torch.equal(back["t"], w.t())


@pytest.mark.parametrize("payload", [b"", b"not safetensors", pickle.dumps({"w": 1}), b"\xff" * 64, "text"])
def test_garbage_is_rejected_with_wire_error(payload):
    with pytest.raises(WireError):
        decode_state(payload)


def test_size_limit():
    with pytest.raises(WireError, match="over the configured limit"):
        decode_state(encode_state({"w": torch.zeros(1000)}), max_bytes=100)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("conv.weight"), "missing"),
        (lambda s: s.update(extra=torch.zeros(1)), "unexpected"),
        (lambda s: s.update({"conv.weight": torch.zeros(4, 3, 3, 2)}), "shape"),
        (lambda s: s.update({"conv.weight": torch.zeros(4, 3, 3, 3, dtype=torch.float64)}), "dtype"),
        (lambda s: s["bn.running_mean"].__setitem__(0, float("nan")), "NaN or Inf"),
        (lambda s: s["conv.weight"].__setitem__((0, 0, 0, 0), float("inf")), "NaN or Inf"),
    ],
)
def test_mismatches_with_the_global_model_are_named(mutate, message):
    reference = _state()
    state = {k: v.clone() for k, v in reference.items()}
    mutate(state)
    with pytest.raises(WireError, match=message):
        check_against_spec(state, spec_of(reference))
