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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_single_non_finite_value_is_found_in_any_slice_of_any_float_dtype(dtype, bad):
    from fedplug.wire import CHECK_SLICE, _finite_in_slices

    t = torch.zeros(2 * CHECK_SLICE + 5, dtype=dtype)
    assert _finite_in_slices(t, None, 0)
    for where in (0, CHECK_SLICE + 7, t.numel() - 1):
        u = t.clone()
        u[where] = bad
        assert not _finite_in_slices(u, None, 0), (dtype, bad, where)


def test_huge_finite_float64_values_whose_sum_overflows_are_still_finite():
    from fedplug.wire import _finite_in_slices

    assert _finite_in_slices(torch.full((10,), 1e308, dtype=torch.float64), None, 0)
    largest = torch.finfo(torch.float32).max  # float32's largest values: their float64 sum cannot overflow
    assert _finite_in_slices(torch.full((1 << 20,), largest, dtype=torch.float32), None, 0)
