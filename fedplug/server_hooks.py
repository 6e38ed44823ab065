"""The server's calls into its role plugins, each checked and labelled with the plugin that answered.

A plugin defect must never surface as a bare traceback, and a deterministic one
(a wrong return type, a config key the plugin does not know) must not cost a
round of client training before it is noticed — let alone a retried one.  So:

- every server-side role hook goes through :func:`call`, which turns an
  exception or a wrong return type into :class:`PluginFailed`, naming the
  plugin, its package and the hook;
- :func:`dry_run` calls the aggregator and the resource policy once at start-up
  on harmless inputs (the global weights as every client's update; idle load
  reports), so such defects stop the run before round 1.

:class:`PluginFailed` is a :class:`~fedplug.server.RunFailed` the round loop
does not retry: the same call would fail the same way.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import torch

from fedplug.types import ClientUpdate, EmptyRoundError, ResourceDecision, ResourceReport
from fedplug.wire import WireError, check_against_spec


class PluginFailed(RuntimeError):
    """A server-side plugin raised or answered wrongly; retrying would not help."""


def describe(plugins: Any, role: str) -> str:
    info = plugins.selected.get(role)
    return f"{role} {info.describe()}" if info is not None else role


def call(plugins: Any, role: str, hook_name: str, check: Callable[[Any], str | None], **kwargs: Any) -> Any:
    """Call ``hook_name`` on the selected plugin; ``check`` returns what is wrong with the answer, or None."""
    who = describe(plugins, role)
    try:
        result = getattr(plugins.hook, hook_name)(**kwargs)
    except (EmptyRoundError, PluginFailed):
        raise
    except Exception as exc:
        raise PluginFailed(f"{who} raised {type(exc).__name__} in {hook_name}: {exc}") from exc
    problem = check(result)
    if problem:
        raise PluginFailed(f"{who} {problem} (from {hook_name})")
    return result


def is_decision(result: Any) -> str | None:
    if not isinstance(result, ResourceDecision):
        return f"returned {type(result).__name__}, expected fedplug.types.ResourceDecision"
    if not isinstance(result.selected, (tuple, list)) or not all(isinstance(c, str) for c in result.selected):
        return f"returned ResourceDecision.selected={result.selected!r}, expected a sequence of client ids"
    return None


def is_round_settings(result: Any) -> str | None:
    if result is None:
        return None
    if not isinstance(result, Mapping):
        return f"returned {type(result).__name__}, expected a mapping of settings or None"
    try:
        json.dumps(dict(result))
    except (TypeError, ValueError) as exc:
        return f"returned settings that are not JSON values ({exc})"
    return None


def model_checker(spec: Any) -> Callable[[Any], str | None]:
    """A ``check`` for ``fedplug_aggregate``: the answer must be a state dict exactly like the global model."""
    def check(result: Any) -> str | None:
        if not isinstance(result, Mapping):
            return f"returned {type(result).__name__}, expected a state dict (name -> tensor)"
        try:
            check_against_spec(result, spec)
        except WireError as exc:
            return f"returned an invalid model: {exc}"
        return None
    return check


def dry_run(plugins: Any, global_weights: Mapping[str, torch.Tensor], spec: Any, aggregator_cfg: Mapping,
            policy_cfg: Mapping, clients_per_round: int, state: Mapping[str, Any]) -> None:
    """Exercise the aggregator and the resource policy once before round 1; raise :class:`PluginFailed`.

    The aggregator gets ``clients_per_round`` (at least 3) updates that all equal
    the global weights, on a copy of its state, so nothing it does here is kept.
    """
    call(plugins, "aggregator", "fedplug_aggregator_round_settings", is_round_settings,
         round_number=1, config=dict(aggregator_cfg))
    ids = [f"dry-run-{k}" for k in range(max(3, int(clients_per_round)))]
    updates = [ClientUpdate(cid, 1, dict(global_weights), 1, 0.0) for cid in ids]
    work_state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in dict(state).items()}
    try:
        call(plugins, "aggregator", "fedplug_aggregate", model_checker(spec), global_weights=dict(global_weights),
             updates=iter(updates), round_number=1, config=dict(aggregator_cfg), state=work_state)
    except EmptyRoundError as exc:
        raise PluginFailed(f"{describe(plugins, 'aggregator')} found nothing to aggregate in {len(ids)} identical "
                           f"updates during the start-up check: {exc}") from None
    reports = {cid: ResourceReport(0.0, "dry-run") for cid in ids}
    call(plugins, "resource_policy", "fedplug_select_clients", is_decision, reports=reports, contacted=list(ids),
         config=dict(policy_cfg))


__all__: Sequence[str] = ("PluginFailed", "call", "dry_run", "is_decision", "is_round_settings", "model_checker")
