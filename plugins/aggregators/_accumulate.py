"""Streaming weighted mean of client updates: the accumulator every FedAvg-like aggregator shares.

``fedavg``, ``fedprox``, ``fedavgm`` and the adaptive optimisers (``fedadam``,
``fedyogi``, ``fedadagrad``) all start from the same quantity, the weighted mean
of the round's client weights, each weighted by its ``num_examples``
(McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", Algorithm 1).  They call :func:`weighted_mean_of_updates`
from their ``fedplug_aggregate`` hook, in the server's aggregation worker thread.

Memory: the updates arrive as a stream (see ``fedplug_aggregate`` in
``fedplug/hooks.py``).  Each update is folded into ONE float64 running sum
and then dropped, so the server holds the running sum (2x the float32 model),
the tensor of the update being folded in (a received update gives each
tensor's pages back once it is folded), one float64 temporary of at most
``SLICE`` values, and nothing else: memory is O(model), independent of the
number of clients.

Integer and bool buffers (BatchNorm's ``num_batches_tracked``): averaged in
float64 like everything else and turned back into the buffer's dtype by
:func:`finish_like`, which rounds the weighted mean to the nearest integer
(ties to even).  Why the rounded mean rather than the max or the sum:
``num_batches_tracked`` only matters for ``BatchNorm(momentum=None)``, where it
is the count behind a cumulative average; the averaged ``running_mean``/
``running_var`` describe a typical client, so the count that goes with them
is the typical client's count, i.e. the weighted mean.  A bool buffer becomes
the weighted majority.  float64 holds every integer below 2**53 exactly, far
beyond any batch count.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from fedplug.types import ClientUpdate, EmptyRoundError, StateDict

ACC_DTYPE = torch.float64


def is_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def check_update_matches(update: ClientUpdate, template: Mapping[str, torch.Tensor]) -> None:
    """Refuse an update whose names or shapes differ from the global model.

    The server validates every update before it reaches an aggregator; this
    cheap check (no tensor data is read) makes a plugin called directly, e.g.
    from a test or notebook, fail with a clear message instead of a broadcast error.
    """
    weights = update.weights
    if weights.keys() != template.keys():
        missing = sorted(template.keys() - weights.keys())[:5]
        extra = sorted(weights.keys() - template.keys())[:5]
        raise ValueError(
            f"update from client {update.client_id!r} does not match the global model's tensor names "
            f"(missing: {missing}, unexpected: {extra})"
        )
    for name, ref in template.items():
        if tuple(weights[name].shape) != tuple(ref.shape):
            raise ValueError(
                f"update from client {update.client_id!r}: tensor {name!r} has shape "
                f"{tuple(weights[name].shape)}, the global model has {tuple(ref.shape)}"
            )
    if update.num_examples < 0:
        raise ValueError(
            f"update from client {update.client_id!r} reports num_examples={update.num_examples}; "
            "it must be >= 0"
        )


SLICE = 1 << 20  # elements folded at a time: the float64 temporary is at most 8 MiB, whatever the tensor


def _slices(acc: torch.Tensor, value: torch.Tensor):
    """``(accumulator part, value part)`` pairs covering a tensor, ``SLICE`` elements each.

    Faster R-CNN's box head alone is 12.8 M values: its float64 copy would be a
    100 MB temporary, more than the rest of the folding costs.  Element-wise
    work gives the same bits whatever the slicing.
    """
    if acc.numel() <= SLICE or not acc.is_contiguous():
        yield acc, value
        return
    flat_acc, flat_value = acc.view(-1), value.reshape(-1)
    for start in range(0, flat_acc.numel(), SLICE):
        yield flat_acc[start:start + SLICE], flat_value[start:start + SLICE]


class RunningWeightedMean:
    """One float64 running weighted sum per tensor, updated in place, one update at a time; divided at the end.

    ``sum_k n_k w_k / sum_k n_k``.  Why a sum and not the incremental mean
    ``mean_k = mean_{k-1} + (n_k / N_k) (w_k - mean_{k-1})``: the updates arrive
    in whatever order the clients finish, and the incremental form rounds
    differently for each order, so the same round could give a global model
    that differs in the last bit of some weights (the mean of a few float32
    values often lies exactly half-way between two float32 numbers, and the
    order-dependent float64 error then decides which way it is rounded).  Each
    product ``n_k * w_k`` is exact in float64 (a float32 value times an integer
    below 2**29), so the sum is exact, and thus the same in any order, as long
    as it fits float64's 53 bits: for a weight whose clients' values lie within
    a factor of about 2**(29 - log2(n_k * clients)) of each other, as copies of
    one weight trained from the same start usually are (otherwise the order can
    still change its last bit).  A float64 tensor of the model keeps the
    incremental mean (its products would round), so one update (or identical
    updates) still comes back bit-exact, whatever the dtype.  Never keeps a
    reference to an added state dict; the only temporary is the float64 copy of
    the tensor being added.
    """

    def __init__(self, template: Mapping[str, torch.Tensor]):
        self.means: dict[str, torch.Tensor] = {
            name: torch.zeros(t.shape, dtype=ACC_DTYPE, device=t.device) for name, t in template.items()
        }
        self.total_weight = 0.0
        self.count = 0
        self._divided = False
        # summed (order-independent) unless the values have more than float32's 24-bit mantissa
        self.summed = {name: t.dtype not in (torch.float64, torch.complex128) for name, t in template.items()}

    def add(self, weights: Mapping[str, torch.Tensor], weight: float) -> None:
        self.count += 1
        if weight == 0:
            return  # contributes nothing; counted so that an all-zero round gets a clear error
        self.total_weight += float(weight)
        fraction = float(weight) / self.total_weight
        # a received update (fedplug.wire.MappedState) can give each tensor's file pages back once it is folded in
        release = getattr(weights, "release_tensor", None)
        for name, acc in self.means.items():
            value = weights[name].detach()
            for acc_part, part in _slices(acc, value):
                if self.summed[name]:  # weight * value is exact in float64: only the sum can round (class docstring)
                    acc_part.add_(part.to(ACC_DTYPE), alpha=float(weight))
                else:  # float64 values: weight * value would round; the incremental mean keeps one update exact
                    # copy=True: never write into the client's tensor (a float64 one would otherwise be it)
                    difference = part.to(ACC_DTYPE, copy=True).sub_(acc_part)
                    acc_part.add_(difference, alpha=fraction)
                    del difference
            if release is not None:
                release(name)

    def mean(self) -> dict[str, torch.Tensor]:
        """The weighted mean in float64 (the accumulator's own tensors, not copies)."""
        if self.count == 0:
            raise EmptyRoundError("no client update to aggregate in this round")
        if self.total_weight <= 0:
            raise ValueError(
                f"all {self.count} updates of this round report num_examples=0, so their weighted mean "
                "is undefined; clients must report how many training examples they used"
            )
        if not self._divided:  # the sums become the means once, in place
            for name, acc in self.means.items():
                if self.summed[name]:
                    acc.div_(self.total_weight)
            self._divided = True
        return self.means


def weighted_mean_of_updates(
    updates: Iterable[ClientUpdate], template: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], int]:
    """Consume ``updates`` once; return (float64 weighted mean per tensor, number of updates).

    Weighted by ``num_examples``.  Raises :class:`~fedplug.types.EmptyRoundError`
    when the stream yields nothing.
    """
    acc = RunningWeightedMean(template)
    for update in updates:
        check_update_matches(update, template)
        acc.add(update.weights, update.num_examples)
        # Drop our reference before blocking on the next update, so a consumed
        # update's tensors can be freed while the next one is being received.
        del update
    return acc.mean(), acc.count


def cast_back(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float64 result in ``like``'s dtype: integer/bool buffers are rounded (ties to even)."""
    if is_float(like):
        return value.to(like.dtype)
    if like.dtype == torch.bool:
        return torch.round(value) > 0  # weighted majority; a tie (0.5) rounds to False
    return torch.round(value).to(like.dtype)


def finish_like(values: dict[str, torch.Tensor], template: Mapping[str, torch.Tensor]) -> StateDict:
    """New state dict in ``template``'s order, names and dtypes, from float64 ``values``.

    ``values`` is emptied as it goes, so each float64 tensor is freed as soon as
    its cast copy exists (the peak is the result plus one float64 tensor, not
    the result plus the whole float64 model).
    """
    out: StateDict = {}
    for name, like in template.items():
        out[name] = cast_back(values.pop(name), like)
    return out
