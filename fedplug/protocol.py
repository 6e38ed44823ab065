"""The Socket.IO event protocol: event names, protocol version and message schemas.

Event names are the original benchmark's, verbatim (see docs/protocol.md).
Every message a peer sends is checked here against its schema before the
server or client acts on it; a message that fails is answered with
``protocol_error`` and dropped.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

PROTOCOL_VERSION = 2  # the newest this code speaks
SUPPORTED_VERSIONS = (1, 2)  # 1: weights inline in one message; 2: chunked, resumable (fedplug/transfer.py)

# client -> server
CLIENT_WAKE_UP = "client_wake_up"
CLIENT_READY = "client_ready"
CHECK_CLIENT_RESOURCE_DONE = "check_client_resource_done"
CLIENT_UPDATE = "client_update"
CLIENT_EVAL = "client_eval"
# server -> client
INIT = "init"
CHECK_CLIENT_RESOURCE = "check_client_resource"
REQUEST_UPDATE = "request_update"
STOP_AND_EVAL = "stop_and_eval"
RUN_FINISHED = "run_finished"  # fedplug addition: the run ended; disconnect and exit
PROTOCOL_ERROR = "protocol_error"  # fedplug addition: your last message was rejected, and why
# client -> server, protocol v2, each answered by a Socket.IO acknowledgement (see fedplug/transfer.py)
BEGIN_UPLOAD = "begin_upload"
UPLOAD_CHUNK = "upload_chunk"
FETCH_CHUNK = "fetch_chunk"
TRANSFER_EVENTS = (BEGIN_UPLOAD, UPLOAD_CHUNK, FETCH_CHUNK)

CLIENT_EVENTS = (CLIENT_WAKE_UP, CLIENT_READY, CHECK_CLIENT_RESOURCE_DONE, CLIENT_UPDATE, CLIENT_EVAL,
                 *TRANSFER_EVENTS)
SERVER_EVENTS = (INIT, CHECK_CLIENT_RESOURCE, REQUEST_UPDATE, STOP_AND_EVAL, RUN_FINISHED, PROTOCOL_ERROR)

MAX_CLIENT_ID_LEN = 128
MAX_METRICS = 64  # client_update.metrics: at most this many entries ...
MAX_METRIC_NAME = 64  # ... with names of at most this many characters
MAX_REASON_LEN = 2000  # a longer reason is cut to this length


class ProtocolError(ValueError):
    """A peer's message that does not follow the protocol; the text says what is wrong."""


_INT = "int"
_NUM = "number"
_STR = "str"
_BOOL = "bool"
_BYTES = "bytes"
_DICT = "dict"
_LIST = "list"

# field -> (kind, required).  Unknown fields are ignored (forward compatibility).
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    CLIENT_WAKE_UP: {
        "client_id": (_STR, True),
        "protocol_version": (_INT, True),
        "token": (_STR, False),
        "info": (_DICT, False),
    },
    CLIENT_READY: {
        "client_id": (_STR, True),
        "num_train": (_INT, True),
        "num_test": (_INT, True),
    },
    CHECK_CLIENT_RESOURCE_DONE: {
        "round_number": (_INT, True),
        "load_rate": (_NUM, True),
        "details": (_DICT, False),
        "reason": (_STR, False),
    },
    CLIENT_UPDATE: {
        "round_number": (_INT, True),
        "ok": (_BOOL, True),
        "weights": (_BYTES, False),
        "weights_ref": (_STR, False),  # v2: the upload_id of a finished upload, instead of weights
        "train_size": (_INT, True),
        "train_loss": (_NUM, True),
        "reason": (_STR, False),
        "seconds": (_NUM, False),
        "metrics": (_DICT, False),
    },
    CLIENT_EVAL: {
        "round_number": (_INT, True),
        "ok": (_BOOL, True),
        "test_size": (_INT, True),
        "test_loss": (_NUM, True),
        "test_map": (_NUM, True),
        "test_recall": (_NUM, True),
        "stats": (_DICT, False),
        "metrics": (_DICT, False),
        "reason": (_STR, False),
    },
    BEGIN_UPLOAD: {
        "round_number": (_INT, True),
        "size": (_INT, True),
        "sha256": (_STR, True),
    },
    UPLOAD_CHUNK: {
        "upload_id": (_STR, True),
        "index": (_INT, True),
        "data": (_BYTES, True),
        "sha256": (_STR, True),
    },
    FETCH_CHUNK: {
        "weights_id": (_STR, True),
        "index": (_INT, True),
    },
}


def _kind_ok(kind: str, value: Any) -> bool:
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == _STR:
        return isinstance(value, str)
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _BYTES:
        return isinstance(value, (bytes, bytearray))
    if kind == _DICT:
        return isinstance(value, dict)
    if kind == _LIST:
        return isinstance(value, list)
    raise AssertionError(kind)


def _metrics(event: str, metrics: Mapping) -> dict[str, float]:
    """A client's numeric training metrics: bounded in count and name length, finite numbers only."""
    if len(metrics) > MAX_METRICS:
        raise ProtocolError(f"{event}: metrics may hold at most {MAX_METRICS} entries, got {len(metrics)}")
    out = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_METRIC_NAME or not key.isprintable():
            raise ProtocolError(f"{event}: metric names must be 1-{MAX_METRIC_NAME} printable characters")
        if not _kind_ok(_NUM, value) or not math.isfinite(float(value)):
            raise ProtocolError(f"{event}: metric {key!r} must be a finite number, got {value!r}")
        out[key] = float(value)
    return out


def parse(event: str, data: Any) -> dict[str, Any]:
    """Validate a client -> server message against its schema; return it as a dict.

    Raises :class:`ProtocolError` naming the first problem found.
    """
    schema = SCHEMAS.get(event)
    if schema is None:
        raise ProtocolError(f"unknown event {event!r}")
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{event}: payload must be an object, got {type(data).__name__}")
    for field, (kind, required) in schema.items():
        if field not in data or data[field] is None:
            if required:
                raise ProtocolError(f"{event}: missing field {field!r} ({kind})")
            continue
        if not _kind_ok(kind, data[field]):
            raise ProtocolError(
                f"{event}: field {field!r} must be {kind}, got {type(data[field]).__name__}"
            )
        if kind == _NUM and not math.isfinite(float(data[field])):
            raise ProtocolError(f"{event}: field {field!r} must be finite, got {data[field]!r}")
    out = dict(data)
    if "client_id" in schema and "client_id" in out:
        cid = out["client_id"]
        if not cid or len(cid) > MAX_CLIENT_ID_LEN or not cid.isprintable():
            raise ProtocolError(
                f"{event}: client_id must be 1-{MAX_CLIENT_ID_LEN} printable characters"
            )
    for field in ("round_number", "num_train", "num_test", "train_size", "test_size", "index", "size"):
        if field in out and out[field] is not None and out[field] < 0:
            raise ProtocolError(f"{event}: field {field!r} must not be negative")
    if event == CHECK_CLIENT_RESOURCE_DONE and not 0.0 <= float(out["load_rate"]) <= 1.0:
        raise ProtocolError(f"{event}: load_rate must be within [0, 1], got {out['load_rate']!r}")
    if event == CLIENT_UPDATE and out["ok"] and not out.get("weights") and not out.get("weights_ref"):
        raise ProtocolError(f"{event}: ok=true requires binary 'weights' (v1) or 'weights_ref' (v2)")
    if event == CLIENT_UPDATE and out.get("weights") and out.get("weights_ref"):
        raise ProtocolError(f"{event}: send either 'weights' or 'weights_ref', not both")
    if event == CLIENT_UPDATE and out.get("metrics") is not None:
        out["metrics"] = _metrics(event, out["metrics"])
    if isinstance(out.get("reason"), str) and len(out["reason"]) > MAX_REASON_LEN:
        out["reason"] = out["reason"][:MAX_REASON_LEN] + " [...]"
    if event == CLIENT_EVAL and out["ok"]:
        for field in ("test_map", "test_recall"):
            if not 0.0 <= float(out[field]) <= 1.0:
                raise ProtocolError(f"{event}: {field} must be within [0, 1], got {out[field]!r}")
    return out
