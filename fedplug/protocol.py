"""The Socket.IO event protocol: event names, protocol version and message schemas.

Event names are the original benchmark's, verbatim (see docs/protocol.md).
Every message a peer sends is checked here against its schema before the
server or client acts on it; a message that fails is answered with
``protocol_error`` and dropped.
"""

from __future__ import annotations

from typing import Any

PROTOCOL_VERSION = 3  # the newest this code speaks
# 1: weights inline in one message; 2: chunked, resumable (fedplug/transfer.py); 3: as 2, with the whole
# blob's sha256 replaced by the chunk-list digest (one hash pass per byte instead of two)
SUPPORTED_VERSIONS = (1, 2, 3)

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
# secure aggregation (secagg.enabled; fedplug/secagg/run.py, docs/protocol.md "Secure aggregation")
SECAGG_SETUP = "secagg_setup"  # server -> client: this round's session, your neighbours, the threshold
SECAGG_KEYS = "secagg_keys"  # client -> server: two X25519 public keys
SECAGG_PEER_KEYS = "secagg_peer_keys"  # server -> client: your neighbours' public keys
SECAGG_SHARES = "secagg_shares"  # client -> server: one sealed envelope of Shamir shares per neighbour
SECAGG_UNMASK = "secagg_unmask"  # server -> client: the survivors (their masked input arrived)
SECAGG_UNMASK_SHARES = "secagg_unmask_shares"  # client -> server: the shares that remove the masks
SECAGG_CLIENT_EVENTS = (SECAGG_KEYS, SECAGG_SHARES, SECAGG_UNMASK_SHARES)
SECAGG_SERVER_EVENTS = (SECAGG_SETUP, SECAGG_PEER_KEYS, SECAGG_UNMASK)

CLIENT_EVENTS = (CLIENT_WAKE_UP, CLIENT_READY, CHECK_CLIENT_RESOURCE_DONE, CLIENT_UPDATE, CLIENT_EVAL,
                 *TRANSFER_EVENTS, *SECAGG_CLIENT_EVENTS)
SERVER_EVENTS = (INIT, CHECK_CLIENT_RESOURCE, REQUEST_UPDATE, STOP_AND_EVAL, RUN_FINISHED, PROTOCOL_ERROR,
                 *SECAGG_SERVER_EVENTS)

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
    SECAGG_KEYS: {
        "round_number": (_INT, True),
        "session": (_STR, True),
        "ok": (_BOOL, True),
        "c_pk": (_BYTES, False),  # required when ok
        "s_pk": (_BYTES, False),
        "reason": (_STR, False),
    },
    SECAGG_SHARES: {
        "round_number": (_INT, True),
        "session": (_STR, True),
        "ok": (_BOOL, True),
        "envelopes": (_DICT, False),  # neighbour id -> bytes; required when ok
        "reason": (_STR, False),
    },
    SECAGG_UNMASK_SHARES: {
        "round_number": (_INT, True),
        "session": (_STR, True),
        "ok": (_BOOL, True),
        "shares": (_DICT, False),  # client id -> {kind: "b" | "s", x: int, y: bytes}; required when ok
        "reason": (_STR, False),
    },
}


def parse(event: str, data: Any) -> dict[str, Any]:
    """Validate a client -> server message; return its known fields as a dict.

    The schemas themselves, strict and bounded, are :mod:`fedplug.schemas`
    (pydantic); ``SCHEMAS`` above lists each event's fields for readers and
    for the test that keeps the two in step.  Raises :class:`ProtocolError`
    naming the first problem found.
    """
    from fedplug import schemas  # schemas imports this module for the event names

    return schemas.parse(event, data)
