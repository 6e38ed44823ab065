"""The built-in resource policies, including the original's "more than half" rule."""

import pytest

from fedplug.plugins import activate
from fedplug.types import ResourceReport


def _hook(name):
    return activate({"resource_policy": name}, observers=False).hook


def test_cpu_load_measures_a_normalised_load():
    report = _hook("cpu_load").fedplug_measure_resources(config={"sample_seconds": 0.1})
    assert 0.0 <= report.load <= 1.0 and report.kind == "cpu"


@pytest.mark.parametrize(
    "loads, proceed, selected",
    [
        ({"a": 0.1, "b": 0.2, "c": 0.9}, True, ("a", "b")),      # 2 of 3 > half
        ({"a": 0.1, "b": 0.5, "c": 0.9}, False, ("a",)),         # 1 of 3 is not more than half
        ({"a": 0.1, "b": 0.3}, True, ("a", "b")),
        ({"a": 0.1, "b": 0.45}, False, ("a",)),                  # exactly half does not pass
        ({"a": 0.39}, True, ("a",)),
        ({"a": 0.4}, False, ()),                                 # threshold is strict
    ],
)
def test_cpu_load_selection_rule(loads, proceed, selected):
    reports = {cid: ResourceReport(load) for cid, load in loads.items()}
    decision = _hook("cpu_load").fedplug_select_clients(reports=reports, contacted=list(loads),
                                                        config={"threshold": 0.4})
    assert decision.proceed is proceed and decision.selected == selected


def test_missing_reports_do_not_qualify():
    reports = {"a": ResourceReport(0.0)}
    d = _hook("cpu_load").fedplug_select_clients(reports=reports, contacted=["a", "b", "c"], config={})
    assert d.selected == ("a",) and not d.proceed and "no answer from b, c" in d.reason


def test_gpu_load_without_a_gpu_is_documented_behaviour():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    hook = _hook("gpu_load")
    report = hook.fedplug_measure_resources(config={})
    assert report.load == 1.0 and report.details["gpu_available"] == 0.0
    fallback = hook.fedplug_measure_resources(config={"no_gpu": "cpu_fallback", "sample_seconds": 0.1})
    assert fallback.kind == "cpu_fallback" and 0.0 <= fallback.load <= 1.0


def test_always_selects_everyone_who_answered():
    d = _hook("always").fedplug_select_clients(
        reports={"a": ResourceReport(1.0), "b": ResourceReport(0.9)}, contacted=["a", "b", "c"], config={})
    assert d.proceed and d.selected == ("a", "b")
