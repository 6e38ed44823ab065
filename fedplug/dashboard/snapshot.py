"""The whole picture of a run as the dashboard page and ``fedplug report`` show it.

:func:`snapshot` reads a live server (called on its event loop, by the
dashboard's handlers); :func:`round_row` turns one
:class:`~fedplug.types.RoundRecord` into the flat row both the page's curves
and the report's table use.  :func:`redact` hides secrets in a config before
it leaves the server or goes into a report someone may forward.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Mapping

from fedplug.dashboard.live import LiveState
from fedplug.types import RoundRecord

SECRET_KEY = re.compile(r"token|secret|password|passphrase|credential", re.IGNORECASE)
HIDDEN = "***"


def redact(config: Any) -> Any:
    """``config`` (plain dicts and lists) with the values of secret-looking keys replaced by ``***``."""
    if isinstance(config, Mapping):
        return {k: (HIDDEN if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v))
                for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [redact(v) for v in config]
    return config


def round_row(record: RoundRecord | Mapping[str, Any]) -> dict[str, Any]:
    """One finished round: the global figures, who took part, and each client's own figures."""
    r = record if isinstance(record, Mapping) else {
        "round_number": record.round_number, "participants": record.participants,
        "train_loss": record.train_loss, "test_loss": record.test_loss, "map50": record.map50,
        "recall": record.recall, "seconds": record.seconds, "per_client": record.per_client,
        "extra": record.extra, "evaluated_by": record.evaluated_by}
    extra = dict(r.get("extra") or {})
    return {
        "round": int(r["round_number"]),
        "participants": list(r.get("participants") or ()),
        "train_loss": r.get("train_loss"),
        "test_loss": r.get("test_loss"),
        "map50": r.get("map50"),
        "recall": r.get("recall"),
        "coco_map": extra.get("coco_map"),
        "epsilon": extra.get("epsilon"),  # differential privacy spent so far (None without a DP aggregator)
        "seconds": r.get("seconds"),
        "evaluated_by": r.get("evaluated_by") or "",
        "per_client": {cid: dict(v) for cid, v in (r.get("per_client") or {}).items()},
    }


def best_of(server: Any) -> dict[str, Any]:
    """The best round so far and where its checkpoint is (None until one was written)."""
    best = dict(getattr(server, "best", None) or {})
    path = Path(server.outputs.checkpoint_dir) / "best.safetensors"
    best["checkpoint"] = str(path) if best.get("round") is not None else None
    return best


def plain_config(server: Any) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = server.cfg
    plain = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
    return redact(plain)


def status(server: Any) -> dict[str, Any]:
    """What every message carries: the phase and the round counter."""
    return {"phase": getattr(server, "phase", "starting"), "round": getattr(server, "round_number", 0),
            "rounds": int(server.cfg.run.rounds)}


def snapshot(server: Any, live: LiveState, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything the page shows, as one JSON-able dict (``config``: the redacted config, if cached)."""
    slots = getattr(server, "clients", {}) or {}
    clients = live.client_list()
    for client in clients:
        slot = slots.get(client["client_id"])
        client["connected"] = slot is not None and slot.sid is not None
    return {
        **status(server),
        "now": time.time(),  # the page measures "for 12 s" against the server's clock, not its own
        "run_dir": str(server.run_dir),
        "clients": clients,
        "history": [round_row(r) for r in getattr(server, "history", [])],
        "best": best_of(server),
        "config": dict(config) if config is not None else plain_config(server),
        "events": list(live.events),
        "rejections": list(live.rejections),
        "rejection_count": live.rejection_count,
    }
