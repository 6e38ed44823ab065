"""Assertions on state dicts shared by the contract suites.

Each raises ``AssertionError`` with a message naming the offending tensor, so a
failing contract test says what is wrong, not just that something is.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from fedplug import wire
from fedplug.types import StateDict


def assert_is_state_dict(value: Any, what: str = "result") -> None:
    assert isinstance(value, Mapping), f"{what} must be a dict of tensors, got {type(value).__name__}"
    for name, tensor in value.items():
        assert isinstance(name, str), f"{what}: key {name!r} is not a string"
        assert isinstance(tensor, torch.Tensor), (
            f"{what}[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}"
        )


def assert_same_layout(result: StateDict, reference: StateDict, what: str = "result") -> None:
    """Same names, shapes and dtypes as ``reference`` (the global model)."""
    assert_is_state_dict(result, what)
    missing = sorted(set(reference) - set(result))
    extra = sorted(set(result) - set(reference))
    assert not missing, f"{what} lacks {missing}"
    assert not extra, f"{what} has names the global model lacks: {extra}"
    for name, ref in reference.items():
        got = result[name]
        assert got.shape == ref.shape, f"{what}[{name!r}] has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{what}[{name!r}] has dtype {got.dtype}, expected {ref.dtype}"
        assert got.device.type == "cpu", f"{what}[{name!r}] is on {got.device}, expected the CPU"


def assert_states_equal(a: StateDict, b: StateDict, what: str = "result") -> None:
    """Bit-for-bit equality, dtype included."""
    assert_is_state_dict(a, what)
    assert_is_state_dict(b, f"the reference for {what}")
    assert set(a) == set(b), f"{what}: names differ: {sorted(set(a) ^ set(b))}"
    for name in a:
        assert a[name].dtype == b[name].dtype, f"{what}[{name!r}]: dtype {a[name].dtype} != {b[name].dtype}"
        assert torch.equal(a[name], b[name]), f"{what}[{name!r}] differs"


def assert_states_close(result: StateDict, expected: StateDict, what: str = "result") -> None:
    """Float tensors equal within float rounding; integer tensors exactly equal."""
    assert_is_state_dict(result, what)
    assert_is_state_dict(expected, f"the reference for {what}")
    assert set(result) == set(expected), f"{what}: names differ: {sorted(set(result) ^ set(expected))}"
    for name, exp in expected.items():
        got = result[name]
        if exp.is_floating_point():
            torch.testing.assert_close(
                got.to(exp.dtype), exp, msg=lambda m, n=name: f"{what}[{n!r}] differs: {m}"
            )
        else:
            assert torch.equal(got, exp), f"{what}[{name!r}] is {got.tolist()}, expected {exp.tolist()}"


def assert_finite(state: StateDict, what: str = "result") -> None:
    assert_is_state_dict(state, what)
    for name, t in state.items():
        if t.is_floating_point():
            assert bool(torch.isfinite(t).all()), f"{what}[{name!r}] holds non-finite values"


def wire_round_trip(state: StateDict, reference: StateDict | None = None) -> StateDict:
    """Send ``state`` through the core's wire format and back, as a peer would receive it.

    Encodes with :func:`fedplug.wire.encode_state` (safetensors bytes) and decodes
    with :func:`fedplug.wire.decode_checked` against the layout of ``reference``
    (default: ``state`` itself), which also rejects non-finite values.  Raises
    what the core would raise: e.g. for a non-tensor value or a sparse tensor.
    """
    spec = wire.spec_of(dict(reference if reference is not None else state))
    return wire.decode_checked(wire.encode_state(dict(state)), spec)


def float_distance(a: StateDict, b: StateDict, names=None) -> float:
    """L2 distance between two states over floating-point tensors (optionally only ``names``)."""
    total = 0.0
    for name in names if names is not None else a:
        x, y = a[name], b[name]
        if x.is_floating_point():
            total += float(((x.double() - y.double()) ** 2).sum())
    return math.sqrt(total)


def states_differ(a: StateDict, b: StateDict) -> list[str]:
    """Names of the floating-point tensors whose values differ."""
    return [n for n in a if a[n].is_floating_point() and not torch.equal(a[n], b[n])]


def assert_plain_state(value: Any, path: str = "state") -> None:
    """Only tensors, numbers, strings (and None), nested in dicts with string keys, lists or tuples.

    That is what the server can store in a checkpoint and restore on resume.
    """
    if isinstance(value, torch.Tensor) or value is None:
        return
    if isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path} has a non-string key {key!r}"
            assert_plain_state(item, f"{path}[{key!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            assert_plain_state(item, f"{path}[{i}]")
        return
    raise AssertionError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}; the aggregator's state "
        "may hold only tensors, numbers and strings (in dicts/lists), which the server checkpoints"
    )
