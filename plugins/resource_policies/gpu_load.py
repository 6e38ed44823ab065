"""``gpu_load``: the resource check on GPU utilisation and memory.

Where a CUDA GPU is visible, the load is the larger of its utilisation and
its memory in use (both 0–1), read through NVML when ``nvidia-ml-py``
(``pynvml``) is installed and otherwise from ``torch.cuda`` (memory only).
With several GPUs the least-loaded one counts, since the client can train there.

On a machine without a GPU the behaviour is set by ``no_gpu`` in the config:
``unqualified`` (default) reports load 1.0 with ``details.gpu_available = 0``,
so GPU-less clients are never chosen while GPU clients are; ``cpu_fallback``
reports the CPU load instead, for mixed fleets where a CPU client is acceptable.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from fedplug.hooks import hookimpl
from fedplug.types import ResourceDecision, ResourceReport
from fedplug_plugins.resource_policies import cpu_load
from fedplug_plugins.resource_policies._threshold import select_below_threshold


def _nvml_loads() -> list[tuple[float, float]] | None:
    try:
        import pynvml  # optional: pip install nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        loads = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            loads.append((util, mem.used / max(mem.total, 1)))
        return loads
    finally:
        pynvml.nvmlShutdown()


def _torch_loads() -> list[tuple[float, float]]:
    import torch

    if not torch.cuda.is_available():
        return []
    loads = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        loads.append((float("nan"), 1.0 - free / max(total, 1)))
    return loads


@hookimpl
def fedplug_measure_resources(config: Mapping[str, Any]) -> ResourceReport:
    loads = _nvml_loads()
    source = "nvml"
    if not loads:
        loads, source = _torch_loads(), "torch"
    if not loads:
        if config.get("no_gpu", "unqualified") == "cpu_fallback":
            report = cpu_load.fedplug_measure_resources(config=config)
            return ResourceReport(report.load, "cpu_fallback", {**report.details, "gpu_available": 0.0})
        return ResourceReport(load=1.0, kind="gpu", details={"gpu_available": 0.0})
    per_gpu = [max(m, 0.0 if u != u else u) for u, m in loads]  # u != u: NaN, utilisation unknown
    best = min(range(len(per_gpu)), key=per_gpu.__getitem__)
    util, mem = loads[best]
    details = {"gpu_available": 1.0, "gpu_index": float(best), "memory_used": mem}
    if util == util:
        details["utilisation"] = util
    details["source_nvml"] = 1.0 if source == "nvml" else 0.0
    return ResourceReport(load=min(max(per_gpu[best], 0.0), 1.0), kind="gpu", details=details)


@hookimpl
def fedplug_select_clients(
    reports: Mapping[str, ResourceReport], contacted: Sequence[str], config: Mapping[str, Any]
) -> ResourceDecision:
    return select_below_threshold(reports, contacted, config)
