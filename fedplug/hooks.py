"""fedplug's hook specifications: the contract between the core and its plugins.

Every plugin is a module (or object) whose functions carry the ``@hookimpl``
marker and are named like the specs below.  The core calls hooks with keyword
arguments only, so a plugin may accept just the arguments it needs.

Roles and who calls what
------------------------

========================  =======================  =========================================
role (config group)       entry-point group        hooks
========================  =======================  =========================================
aggregator                ``fedplug.aggregators``  ``fedplug_aggregate``,
                                                   ``fedplug_aggregator_round_settings``,
                                                   ``fedplug_aggregator_privacy``
detector (``model``)      ``fedplug.detectors``    ``fedplug_build_model``,
                                                   ``fedplug_train_round``, ``fedplug_evaluate``
resource_policy           ``fedplug.resource_policies``  ``fedplug_measure_resources``,
                                                   ``fedplug_select_clients``
codec                     ``fedplug.codecs``       ``fedplug_encode_update``,
                                                   ``fedplug_decode_update``
update_filter             ``fedplug.update_filters``  ``fedplug_filter_update`` (selected by the
                                                   aggregator's round settings, run on clients)
observer                  ``fedplug.observers``    ``fedplug_run_start`` ... ``fedplug_run_end``
========================  =======================  =========================================

Exactly one plugin is registered per role (the one the config selects), so the
role hooks are ``firstresult``: the selected plugin's answer is *the* answer.
Every installed observer is registered (unless disabled in config) and each
observer hook is called on all of them; their return values are ignored, and
an observer that raises is logged and skipped: it never ends a run.

A plugin's own settings come from its config group (e.g. ``conf/aggregator/
fedavg.yaml``) and reach it as the ``config`` argument: a plain ``dict`` with
the ``name`` key and the plugin's parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from fedplug.types import (
        ClientUpdate,
        EvalResult,
        EvalSettings,
        PrivacyMechanism,
        ResourceDecision,
        ResourceReport,
        RoundRecord,
        StateDict,
        TrainResult,
        TrainSettings,
    )

PROJECT = "fedplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -------------------------------------------------------------------------
# Aggregation (server process)
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def fedplug_aggregate(
    global_weights: StateDict,
    updates: Iterable[ClientUpdate],
    round_number: int,
    config: Mapping[str, Any],
    state: dict,
) -> StateDict:
    """Combine one round's client updates into the next global weights.

    Called by the server once per round, in a worker thread (never on the
    event loop), when the round's ``request_update`` goes out: *before* any
    update has arrived.  The first iteration of ``updates`` blocks until the
    first update is accepted, so aggregation overlaps the clients' training.
    If the round closes without any accepted update the stream ends empty:
    raise :class:`~fedplug.types.EmptyRoundError` (the server then counts the
    round as failed; the global model is unchanged).

    :param global_weights: the global model's full state (parameters and
        buffers) that the clients started this round from.  Read-only.
    :param updates: the round's accepted :class:`~fedplug.types.ClientUpdate`
        values, **as a stream**: iterating blocks until the next update arrives
        and ends when the round's deadline or quorum closes it.  Consume it
        once; do not keep every update unless the method's definition needs
        all of them at once (median, Krum), and say so in the docstring.
        Each update's weights match ``global_weights`` in names, shapes and
        dtypes and are finite.  Read-only.  Under secure aggregation
        (``secagg.enabled``) the server calls this after unmasking instead,
        and the stream yields one update, ``client_id`` ``"secagg"``: the
        FedAvg mean of the round, with ``num_examples`` the clients' total.
    :param round_number: the round being aggregated, from 1.
    :param config: this aggregator's config group as a dict.
    :param state: the aggregator's persistent state across rounds (e.g. server
        momentum, optimiser moments).  The server stores it in checkpoints and
        restores it on resume; put only tensors, numbers and strings in it.
    :return: the new global state dict: the same names, shapes and dtypes as
        ``global_weights``.  Integer buffers (``num_batches_tracked``) must
        stay integer tensors.
    :raises fedplug.types.EmptyRoundError: when ``updates`` yields nothing.
    """


@hookspec(firstresult=True)
def fedplug_aggregator_round_settings(
    round_number: int, config: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """Settings the server sends to every client with this round's ``request_update``.

    Called by the server before each round's ``request_update``.  Aggregators
    that need client cooperation return them here, e.g. FedProx returns
    ``{"proximal_mu": 0.01}``; the client's detector receives them in
    :class:`~fedplug.types.TrainSettings`.  Only JSON values.

    :return: a mapping of :class:`~fedplug.types.TrainSettings` field names to
        values, or ``None`` for nothing.  They override the run's ``train:``
        settings for this round.  A key that is not a ``TrainSettings`` field
        is not an error: it reaches the detector in ``settings.extra`` (a dict),
        e.g. ``{"my_hint": 3}`` gives ``settings.extra["my_hint"] == 3``.
    """


@hookspec(firstresult=True)
def fedplug_aggregator_privacy(round_number: int, config: Mapping[str, Any]) -> PrivacyMechanism | None:
    """The differentially private release this aggregator makes in round ``round_number``, if any.

    Optional.  Called by the server (its privacy ledger, ``fedplug/privacy/
    ledger.py``) at start-up for the first round it will run, and before every
    round: the answer feeds the privacy accountant, whose (epsilon, delta) goes
    into the round's metrics (``epsilon``, ``delta`` in ``RoundRecord.extra``)
    and stops the run before a round that would exceed ``privacy.max_epsilon``.
    It must depend only on ``round_number`` and ``config``, never on the
    clients' data, since it is asked before the round runs.

    :return: a :class:`~fedplug.types.PrivacyMechanism` (e.g. DP-FedAvg returns
        ``PrivacyMechanism("central", noise_multiplier=z, clip_norm=C)``), or
        ``None`` for an aggregator that adds no noise (the default).
    """


# -------------------------------------------------------------------------
# Detector: building (server and clients), training and evaluation (clients)
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def fedplug_build_model(config: Mapping[str, Any], class_names: Sequence[str]) -> torch.nn.Module:
    """Build the detector with freshly initialised (or configured pretrained) weights.

    Called by the server once at start-up to create the global model, and by
    each client after ``init`` with the *same* ``config`` and ``class_names``
    the server used, so that both sides hold identical architectures.

    :param config: the ``model`` config group as a dict (the server sends it
        to clients in ``init``).
    :param class_names: the object classes, without background.
    :return: a ``torch.nn.Module`` whose ``state_dict()`` is what travels on
        the wire.  It must be deterministic for a given ``config["seed"]``.
    """


@hookspec(firstresult=True)
def fedplug_train_round(
    model: torch.nn.Module,
    dataset: Any,
    settings: TrainSettings,
    global_weights: StateDict,
    state: dict,
) -> TrainResult:
    """Train the model on the client's local data for one round.

    Called by a client, in a worker thread, after it loaded the round's global
    weights into ``model``.

    :param model: the client's model, already holding ``global_weights``.
    :param dataset: the client's training split: a map-style dataset returning
        ``(image, target)`` in torchvision's detection format (image float
        ``[C,H,W]`` in ``[0,1]``; target ``boxes`` xyxy float, ``labels`` int64
        from 1).
    :param settings: epochs, optimiser, batch size, device, and the server's
        per-round settings such as ``proximal_mu`` (FedProx: add
        ``mu/2·||w - global_weights||²`` to the loss when non-zero).
    :param global_weights: the round's starting weights (for proximal terms).
    :param state: the client's persistent state across rounds, e.g. optimiser
        state when ``settings.keep_optimizer_state`` is true.
    :return: a :class:`~fedplug.types.TrainResult`.  A non-finite loss must
        stop training and return ``ok=False`` with the reason, never raise.
    """


@hookspec(firstresult=True)
def fedplug_evaluate(model: torch.nn.Module, dataset: Any, settings: EvalSettings) -> EvalResult:
    """Evaluate the model on the client's local test split.

    Called by a client, in a worker thread, after ``stop_and_eval`` loaded the
    aggregated weights into ``model``.

    :return: an :class:`~fedplug.types.EvalResult` with the test loss, the
        Pascal-VOC mAP@0.5 and recall, and the mergeable
        :class:`~fedplug.types.DetectionStats` the server uses to compute
        the exact global mAP over all clients.
    """


# -------------------------------------------------------------------------
# Resource policy: measured by clients, decided by the server
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def fedplug_measure_resources(config: Mapping[str, Any]) -> ResourceReport:
    """Measure this client's current load.

    Called by a client, in a worker thread, on each ``check_client_resource``.
    Must return within about a second.

    :return: a :class:`~fedplug.types.ResourceReport` with ``load`` in [0, 1].
    """


@hookspec(firstresult=True)
def fedplug_select_clients(
    reports: Mapping[str, ResourceReport],
    contacted: Sequence[str],
    config: Mapping[str, Any],
) -> ResourceDecision:
    """Decide which contacted clients take part in the round, and whether it starts now.

    Called by the server (on the event loop: must be quick and never block)
    when the resource check's answers are in or its deadline passed.

    :param reports: the reports that arrived, by client id (a client that did
        not answer in time is absent).
    :param contacted: the client ids asked this round.
    :return: a :class:`~fedplug.types.ResourceDecision` whose ``selected`` is
        a subset of ``contacted``; with ``proceed=False`` the server backs off
        and asks again.
    """


# -------------------------------------------------------------------------
# Codec: clients encode their update, the server decodes it (fedplug.codecs)
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def fedplug_encode_update(
    weights: StateDict, reference: StateDict, config: Mapping[str, Any], state: dict
) -> bytes:
    """Turn a client's trained weights into the bytes its ``client_update`` carries.

    Called by a client, in a worker thread, after each round's training, with
    the codec the server announced in ``init.codec``.  The server decodes the
    bytes with :func:`fedplug_decode_update` of the same codec, relative to the
    same ``reference``.

    :param weights: the full trained state (parameters and buffers), the
        layout of ``reference``.  Read-only.
    :param reference: the round's global model, exactly as the server holds
        it: a delta codec encodes ``weights - reference``.  Read-only.
    :param config: this codec's config group as a dict (``name`` and its
        settings), as the server sent it.
    :param state: the client's codec state across rounds (e.g. the residual
        of what a sparsifying codec left out, fed back next round).  The core
        passes a throw-away dict to its start-up check.
    :return: the encoded bytes, at most the model's raw tensor bytes plus
        64 KiB and 512 B per tensor (the server refuses larger uploads).
    :raises fedplug.wire.WireError: when the weights cannot be encoded (say,
        a value beyond the transport dtype's range); the client then reports
        a failed round with the message.
    """


@hookspec(firstresult=True)
def fedplug_decode_update(
    data: bytes, reference: StateDict, config: Mapping[str, Any], max_bytes: int
) -> StateDict:
    """Turn a peer's ``client_update`` bytes back into a full state dict.

    Called by the server, in a worker thread, for each update it accepts
    for the round (before the aggregator sees it), and by its start-up check.
    ``data`` comes from the network: treat it as hostile — never unpickle
    it, bound every size it claims by ``max_bytes`` and the reference's
    shapes, and raise :class:`~fedplug.wire.WireError` with the reason for
    anything malformed.

    :param data: the update's bytes (``bytes`` or ``memoryview``).
    :param reference: the round's global model the client encoded against.
        Read-only.
    :param config: this codec's config group as a dict.
    :param max_bytes: the most bytes a valid encoding of this model takes;
        ``data`` is never longer, and no decoded buffer needs to be larger.
    :return: a full state dict with exactly the names, shapes and dtypes of
        ``reference`` (floating tensors restored to the global dtype); the
        core checks that and finiteness before the aggregator sees it.
    :raises fedplug.wire.WireError: for bytes that are not a valid encoding.
    """


# -------------------------------------------------------------------------
# Update filter (client process): chosen by the aggregator, applied before sending
# -------------------------------------------------------------------------


@hookspec(firstresult=True)
def fedplug_filter_update(
    result: TrainResult, global_weights: StateDict, settings: TrainSettings, config: Mapping[str, Any]
) -> TrainResult:
    """Transform a client's training result before it leaves the site (clip it, noise it).

    Called by a client, in its worker thread, after a successful
    ``fedplug_train_round`` and before the weights are encoded, when the
    round's settings name this filter: the aggregator's
    ``fedplug_aggregator_round_settings`` returns ``{"update_filter": {"name":
    <filter>, ...}}`` (``fedplug/update_filter.py``).  Built-ins: ``dp_clip``
    (L2 clipping of the change from ``global_weights``) and ``dp_local``
    (clipping plus Gaussian noise: local differential privacy).

    :param result: the detector's result; ``result.weights`` is the full trained
        state.  Read-only.
    :param global_weights: the round's global model the client started from.  Read-only.
    :param settings: the round's training settings (``round_number``, ``extra``).
    :param config: the filter's settings as the aggregator sent them (``name`` included).
    :return: a :class:`~fedplug.types.TrainResult` whose weights have the
        model's names, shapes and dtypes.  An exception makes the client
        report a failed round (it never sends the unfiltered update).
    """


# -------------------------------------------------------------------------
# Observers (server process): lifecycle events, any number of plugins
# -------------------------------------------------------------------------


@hookspec
def fedplug_run_start(config: Mapping[str, Any], run_dir: Path) -> None:
    """Called by the server once, after the global model was built and before round 1.

    ``run_dir`` is where the run writes its outputs; an observer may add files there.
    """


@hookspec
def fedplug_client_joined(client_id: str, info: Mapping[str, Any]) -> None:
    """Called by the server when a client answered ``client_ready`` (also after a reconnect)."""


@hookspec
def fedplug_client_left(client_id: str, reason: str) -> None:
    """Called by the server when a client disconnected or was dropped."""


@hookspec
def fedplug_round_start(round_number: int, client_ids: Sequence[str]) -> None:
    """Called by the server when a round's ``request_update`` went out to ``client_ids``."""


@hookspec
def fedplug_round_end(
    record: RoundRecord, global_weights: StateDict, previous_weights: StateDict
) -> None:
    """Called by the server after a round was aggregated (and evaluated, on evaluation rounds).

    Called in a worker thread. ``global_weights`` is the new global model and
    ``previous_weights`` the one the round started from; both are read-only.
    """


@hookspec
def fedplug_run_end(rounds: Sequence[RoundRecord], best_round: int | None, reason: str) -> None:
    """Called by the server once when the run ends, for any reason (``reason`` says which)."""
