"""Message schemas: every malformed peer message is rejected with a reason."""

import pytest

from fedplug import protocol as P


def test_valid_messages_parse():
    assert P.parse(P.CLIENT_WAKE_UP, {"client_id": "a", "protocol_version": 1})["client_id"] == "a"
    msg = P.parse(P.CLIENT_UPDATE, {"round_number": 2, "ok": True, "weights": b"x", "train_size": 3,
                                    "train_loss": 0.5, "future_field": 1})
    assert msg["round_number"] == 2


@pytest.mark.parametrize(
    "event, data, reason",
    [
        ("nope", {}, "unknown event"),
        (P.CLIENT_WAKE_UP, "hello", "must be an object"),
        (P.CLIENT_WAKE_UP, {"protocol_version": 1}, "missing field 'client_id'"),
        (P.CLIENT_WAKE_UP, {"client_id": "", "protocol_version": 1}, "client_id"),
        (P.CLIENT_WAKE_UP, {"client_id": "x" * 500, "protocol_version": 1}, "client_id"),
        (P.CLIENT_WAKE_UP, {"client_id": "a", "protocol_version": "1"}, "must be an integer"),
        (P.CHECK_CLIENT_RESOURCE_DONE, {"round_number": 1, "load_rate": 1.5}, "within"),
        (P.CHECK_CLIENT_RESOURCE_DONE, {"round_number": 1, "load_rate": float("nan")}, "finite"),
        (P.CHECK_CLIENT_RESOURCE_DONE, {"round_number": -1, "load_rate": 0.1}, "negative"),
        (P.CLIENT_UPDATE, {"round_number": 1, "ok": True, "train_size": 1, "train_loss": 0.1}, "requires binary"),
        (P.CLIENT_UPDATE, {"round_number": 1, "ok": True, "weights": "text", "train_size": 1,
                           "train_loss": 0.1}, "must be binary"),
        (P.CLIENT_UPDATE, {"round_number": True, "ok": True, "weights": b"x", "train_size": 1,
                           "train_loss": 0.1}, "must be an integer"),
        (P.CLIENT_EVAL, {"round_number": 1, "ok": True, "test_size": 1, "test_loss": 0.1, "test_map": 2.0,
                         "test_recall": 0.1}, "within"),
    ],
)
def test_malformed_messages_are_rejected(event, data, reason):
    with pytest.raises(P.ProtocolError, match=reason):
        P.parse(event, data)
