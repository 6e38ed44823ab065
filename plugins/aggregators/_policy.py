"""Which tensors of a model state a server optimiser may step, and which it only averages.

A state dict mixes trainable parameters with buffers.  Server optimisers
(``fedavgm``'s momentum, ``fedadam``/``fedyogi``/``fedadagrad``'s adaptive
steps) treat the change of a *parameter* as a pseudo-gradient.  BatchNorm's
running statistics are not parameters: they are estimates of activation
moments, and pushing them with momentum or an adaptive step can overshoot
(a ``running_var`` below zero turns every later activation into NaN).  Integer
buffers (``num_batches_tracked``) are counters.  So those aggregators give both
kinds the plain weighted mean (what FedAvg does) and step only the rest.

The robust aggregators (median, trimmed mean, Krum) apply their rule to every
tensor instead: a Byzantine client can poison running statistics as easily as
weights, so those need the robust rule too.

Only the state dict reaches an aggregator, so buffers are recognised by name:
a tensor whose name ends in one of :data:`RUNNING_STAT_SUFFIXES` (torch's
BatchNorm, SyncBatchNorm and InstanceNorm with ``track_running_stats``), or
any non-floating tensor.  torchvision's ``FrozenBatchNorm2d`` also names its
buffers ``running_mean``/``running_var``; clients never change them, so
averaging them is a no-op, as it should be.
"""

from __future__ import annotations

import torch

RUNNING_STAT_SUFFIXES = ("running_mean", "running_var")


def is_running_statistic(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in RUNNING_STAT_SUFFIXES


def is_stepped_by_server_optimiser(name: str, tensor: torch.Tensor) -> bool:
    """True for floating tensors that are not running statistics."""
    return tensor.is_floating_point() and not is_running_statistic(name)
