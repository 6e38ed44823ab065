"""fedplug.schemas: strict, bounded message schemas, checked by examples and by property-based fuzzing.

The fuzz tests throw hypothesis-generated payloads — arbitrary JSON-like
values, and valid messages with one field replaced — at ``schemas.parse`` for
every client -> server event: nothing but ``ProtocolError`` may come out, its
text is one bounded line, and whatever is accepted respects every bound.
"""

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedplug import protocol as P
from fedplug import schemas as S

SHA = "ab" * 32

VALID = {
    P.CLIENT_WAKE_UP: {"client_id": "site-a", "protocol_version": 2, "token": "t",
                       "info": {"device": "cpu", "host": "h", "threads": 4, "gpu": None, "amp": False}},
    P.CLIENT_READY: {"client_id": "site-a", "num_train": 48, "num_test": 12},
    P.CHECK_CLIENT_RESOURCE_DONE: {"round_number": 3, "load_rate": 0.25, "details": {"kind": "cpu", "cpu": 0.25},
                                   "reason": "fine"},
    P.CLIENT_UPDATE: {"round_number": 3, "ok": True, "weights": b"\x00" * 16, "train_size": 48, "train_loss": 0.5,
                      "seconds": 1.5, "metrics": {"steps": 12, "lr": 0.01}},
    P.CLIENT_EVAL: {"round_number": 3, "ok": True, "test_size": 12, "test_loss": 0.7, "test_map": 0.5,
                    "test_recall": 0.5, "metrics": {"ap_car": 0.5},
                    "stats": {"num_classes": 2, "scores": [[0.9, 0.2], []], "true_positive": [[True, False], []],
                              "num_ground_truth": [1, 0], "coco_scores": [[0.9, 0.2], []],
                              "coco_true_positive": [[1023, 0], []], "coco_ignored": [[0, 0], []]}},
    P.BEGIN_UPLOAD: {"round_number": 3, "size": 1000, "sha256": SHA},
    P.UPLOAD_CHUNK: {"upload_id": "site-a-r3-0123456789ab", "index": 0, "data": b"x" * 100, "sha256": SHA},
    P.FETCH_CHUNK: {"weights_id": "r3-global-0123456789abcdef", "index": 2},
    P.SECAGG_KEYS: {"round_number": 3, "session": "0123456789abcdef", "ok": True, "c_pk": b"c" * 32,
                    "s_pk": b"s" * 32},
    P.SECAGG_SHARES: {"round_number": 3, "session": "0123456789abcdef", "ok": True,
                      "envelopes": {"site-b": b"e" * 150, "site-c": b"f" * 150}},
    P.SECAGG_UNMASK_SHARES: {"round_number": 3, "session": "0123456789abcdef", "ok": True,
                             "shares": {"site-b": {"kind": "b", "x": 1, "y": b"y" * 66},
                                        "site-c": {"kind": "s", "x": 2, "y": b"z" * 66}}},
}


# ---------------------------------------------------------------------- coverage of the protocol


def test_every_client_event_has_a_schema_with_every_field():
    assert set(S.MODELS) == set(P.SCHEMAS) == set(P.CLIENT_EVENTS)
    for event, fields in P.SCHEMAS.items():
        model_fields = set(S.MODELS[event].model_fields)
        assert set(fields) <= model_fields, (event, set(fields) - model_fields)
        required = {f for f, (_, req) in fields.items() if req}
        assert required == {f for f, info in S.MODELS[event].model_fields.items() if info.is_required()}, event


@pytest.mark.parametrize("event", sorted(VALID))
def test_valid_messages_parse_to_their_known_fields(event):
    data = dict(VALID[event], some_future_field=[1, 2])
    out = S.parse(event, data)
    assert "some_future_field" not in out
    for key, value in VALID[event].items():
        if key != "stats":
            assert out[key] == value, key
    assert all(v is not None for v in out.values())


def test_stats_come_back_in_the_shape_detection_stats_reads():
    from fedplug.types import DetectionStats

    out = S.parse(P.CLIENT_EVAL, VALID[P.CLIENT_EVAL])
    stats = DetectionStats.from_json(out["stats"])
    assert stats.num_classes == 2 and stats.has_coco and stats.true_positive == [[True, False], []]
    plain = dict(VALID[P.CLIENT_EVAL], stats={k: v for k, v in VALID[P.CLIENT_EVAL]["stats"].items()
                                              if not k.startswith("coco")})
    assert not DetectionStats.from_json(S.parse(P.CLIENT_EVAL, plain)["stats"]).has_coco


def _with(event, **changes):
    data = dict(VALID[event])
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return data


_DROP = object()
UPD, EV, RES, WAKE = P.CLIENT_UPDATE, P.CLIENT_EVAL, P.CHECK_CLIENT_RESOURCE_DONE, P.CLIENT_WAKE_UP


def _stats(**changes):
    return dict(VALID[EV]["stats"], **changes)


@pytest.mark.parametrize("event, data, reason", [
    ("nope", {}, "unknown event 'nope'"),
    ("x" * 10_000, {}, "unknown event"),
    (WAKE, "hello", "payload must be an object"),
    (WAKE, _with(WAKE, client_id=_DROP), "missing field 'client_id'"),
    (WAKE, _with(WAKE, client_id=""), "'client_id' must not be empty"),
    (WAKE, _with(WAKE, client_id="x" * 129), "'client_id' must be at most 128"),
    (WAKE, _with(WAKE, client_id="a\x1b[2Jb"), "printable"),
    (WAKE, _with(WAKE, protocol_version="2"), "'protocol_version' must be an integer, got a string"),
    (WAKE, _with(WAKE, info={f"k{i}": 1 for i in range(100)}), "at most 32"),
    (WAKE, _with(WAKE, info={"host": "h" * 1000}), "info 'host'"),
    (P.CLIENT_READY, _with(P.CLIENT_READY, num_train=10**30), "'num_train' must be within [0, 1000000000]"),
    (P.CLIENT_READY, _with(P.CLIENT_READY, num_train=48.0), "'num_train' must be an integer, got a number"),
    (P.CLIENT_READY, _with(P.CLIENT_READY, num_test=True), "'num_test' must be an integer, got a boolean"),
    (RES, _with(RES, load_rate=1.5), "'load_rate' must be within [0, 1]"),
    (RES, _with(RES, load_rate=float("nan")), "'load_rate' must be finite"),
    (RES, _with(RES, load_rate="0.1"), "'load_rate' must be a number, got a string"),
    (RES, _with(RES, load_rate=10**400), "'load_rate' must be a number in range"),
    (RES, _with(RES, round_number=-1), "must not be negative"),
    (RES, _with(RES, details={"cpu": float("inf")}), "detail 'cpu'"),
    (UPD, _with(UPD, weights=_DROP), "requires binary 'weights'"),
    (UPD, _with(UPD, weights="text"), "'weights' must be binary"),
    (UPD, _with(UPD, weights_ref="site-a-r3-0123"), "either 'weights' or 'weights_ref'"),
    (UPD, _with(UPD, ok=1), "'ok' must be true or false, got an integer"),
    (UPD, _with(UPD, round_number=True), "'round_number' must be an integer, got a boolean"),
    (UPD, _with(UPD, train_size=10**30), "'train_size' must be within [0, 1000000000], got an integer of about 31"),
    (UPD, _with(UPD, train_size="48"), "'train_size' must be an integer, got a string"),
    (UPD, _with(UPD, train_loss=1e308), "'train_loss' must be within"),
    (UPD, _with(UPD, seconds=-1.0), "'seconds' must not be negative"),
    (UPD, _with(UPD, metrics={"x" * 65: 1.0}), "metric names"),
    (UPD, _with(UPD, metrics={"lr": "0.1"}), "metric 'lr' must be a number, got a string"),
    (UPD, _with(UPD, metrics={"lr": True}), "metric 'lr' must be a number, got a boolean"),
    (UPD, _with(UPD, metrics={f"m{i}": 1 for i in range(65)}), "at most 64 entries"),
    (EV, _with(EV, test_map=2.0), "'test_map' must be within [0, 1]"),
    (EV, _with(EV, stats=_stats(scores=[["0.9", 0.2], []])), "'stats.scores[0][0]' must be a number, got a string"),
    (EV, _with(EV, stats=_stats(true_positive=[[1, 0], []])), "'stats.true_positive[0][0]' must be true or false"),
    (EV, _with(EV, stats=_stats(num_ground_truth=[1.5, 0])), "'stats.num_ground_truth[0]' must be an integer"),
    (EV, _with(EV, stats=_stats(num_ground_truth=[-1, 0])), "must not be negative"),
    (EV, _with(EV, stats=_stats(num_ground_truth=[0, 0])), "class 0: 1 true positives but only 0 ground-truth"),
    (EV, _with(EV, stats=_stats(num_classes=3)), "must each list 3 classes"),
    (EV, _with(EV, stats=_stats(scores=[[0.9], []])), "class 0: 1 scores but 2 true_positive"),
    (EV, _with(EV, stats=_stats(scores=[[float("nan"), 0.2], []])), "finite"),
    (EV, _with(EV, stats=_stats(coco_ignored=None)), "all or none"),
    (EV, _with(EV, stats=_stats(coco_true_positive=[[1024, 0], []])), "must be < 1024"),
    (EV, _with(EV, stats=_stats(coco_scores=[[0.9], []])), "coco_ lists disagree"),
    (EV, _with(EV, stats={"num_classes": 1, "scores": [[0.5] * (S.MAX_STATS_ENTRIES + 1)],
                          "true_positive": [[]], "num_ground_truth": [0]}), "at most 10000000 detections"),
    (P.BEGIN_UPLOAD, _with(P.BEGIN_UPLOAD, sha256="AB" * 32), "64 lower-case hex digits"),
    (P.BEGIN_UPLOAD, _with(P.BEGIN_UPLOAD, size=0), "'size'"),
    (P.UPLOAD_CHUNK, _with(P.UPLOAD_CHUNK, data="text"), "'data' must be binary"),
    (P.UPLOAD_CHUNK, _with(P.UPLOAD_CHUNK, upload_id="u" * 300), "at most 256"),
    (P.FETCH_CHUNK, _with(P.FETCH_CHUNK, index=1.0), "'index' must be an integer"),
])
def test_malformed_messages_are_refused_naming_the_field(event, data, reason):
    with pytest.raises(P.ProtocolError) as info:
        S.parse(event, data)
    text = str(info.value)
    assert reason in text
    assert "\n" not in text and len(text) <= S.MAX_ERROR_LEN


def test_a_long_reason_is_cut_and_made_one_printable_line():
    out = S.parse(UPD, _with(UPD, ok=False, weights=_DROP, reason="line one\nline two\x1b[31m" + "x" * 10**6))
    assert out["reason"].startswith("line one line two\ufffd[31m")
    assert len(out["reason"]) <= S.MAX_REASON_LEN + len(" [...]") and out["reason"].isprintable()


def test_the_auth_payload_is_bounded_too():
    assert S.parse_auth(None) == {}
    assert S.parse_auth({"client_id": "a", "secret": "s"}) == {"client_id": "a", "secret": "s"}
    for bad, reason in ((["x"], "payload must be an object"), ({"secret": "s" * 300}, "'secret' must be at most"),
                        ({"client_id": 7}, "'client_id' must be a string"), ({"token": ""}, "must not be empty")):
        with pytest.raises(P.ProtocolError, match="^connect: .*" + reason.replace("(", r"\(")):
            S.parse_auth(bad)


# ---------------------------------------------------------------------- fuzzing

# JSON-like values as python-socketio hands them to a handler, with binary attachments and the
# awkward numbers that broke the hand-written checks (huge integers, non-finite floats)
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from([0, 1, -1, 10**9, 10**9 + 1, 2**31, 10**30, -10**400]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, 1e9, 1e308, -0.0, 0.5]),
    st.text(max_size=30), st.sampled_from(["", "x" * 129, "a\nb", SHA, "ü" * 300]),
    st.binary(max_size=40),
)
_json = st.recursive(_leaves, lambda children: st.one_of(
    st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children, max_size=5)), max_leaves=25)
_FUZZ = settings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _check_bounds(event, out):
    """What any accepted message guarantees, restated independently of the schema code."""
    model = S.MODELS[event]
    assert set(out) <= set(model.model_fields)
    for key, value in out.items():
        if key in ("round_number", "num_train", "num_test", "train_size", "test_size", "index", "size",
                   "protocol_version"):
            assert type(value) is int and 0 <= value <= 2**40, (key, value)
        if key in ("num_train", "num_test", "train_size", "test_size"):
            assert value <= S.MAX_EXAMPLES
        if key in ("train_loss", "test_loss", "seconds", "load_rate", "test_map", "test_recall"):
            assert type(value) is float and math.isfinite(value) and abs(value) <= S.MAX_LOSS, (key, value)
        if key in ("load_rate", "test_map", "test_recall"):
            assert 0.0 <= value <= 1.0
        if key == "ok":
            assert type(value) is bool
        if key in ("client_id", "upload_id", "weights_id", "weights_ref", "token", "sha256"):
            assert type(value) is str and len(value) <= 256 and value.isprintable()
        if key == "reason":
            assert type(value) is str and len(value) <= S.MAX_REASON_LEN + 6 and value.isprintable()
        if key in ("weights", "data"):
            assert type(value) is bytes
        if key == "session":
            assert type(value) is str and len(value) == 16 and all(c in "0123456789abcdef" for c in value)
        if key in ("c_pk", "s_pk"):
            assert type(value) is bytes and len(value) == 32
        if key in ("envelopes", "shares"):
            assert isinstance(value, dict)
            for peer, item in value.items():
                assert type(peer) is str and 0 < len(peer) <= 128 and peer.isprintable()
                if key == "envelopes":
                    assert type(item) is bytes and 0 < len(item) <= S.MAX_ENVELOPE_BYTES
                else:
                    assert item["kind"] in ("b", "s") and type(item["x"]) is int and item["x"] >= 1
                    assert type(item["y"]) is bytes and len(item["y"]) == S.MAX_SHARE_BYTES
        if key in ("metrics", "details", "info"):
            assert isinstance(value, dict) and len(value) <= S.MAX_METRICS
            for name, v in value.items():
                assert type(name) is str and 0 < len(name) <= S.MAX_METRIC_NAME and name.isprintable()
                assert v is None or type(v) in (bool, float, str)
                if type(v) is float:
                    assert math.isfinite(v) and abs(v) <= S.MAX_METRIC_VALUE
                if type(v) is str:
                    assert len(v) <= S.MAX_INFO_VALUE_LEN
        if key == "stats":
            n = value["num_classes"]
            assert type(n) is int and 0 <= n <= S.MAX_CLASSES
            assert len(value["scores"]) == len(value["true_positive"]) == len(value["num_ground_truth"]) == n
            for scores, flags, gt in zip(value["scores"], value["true_positive"], value["num_ground_truth"]):
                assert len(scores) == len(flags) and all(type(f) is bool for f in flags)
                assert all(type(s) is float and math.isfinite(s) for s in scores)
                assert type(gt) is int and 0 <= gt and sum(flags) <= gt
    if event == P.CLIENT_UPDATE and out["ok"]:
        assert bool(out.get("weights")) != bool(out.get("weights_ref"))


def _parse_or_refuse(event, data):
    try:
        out = S.parse(event, data)
    except P.ProtocolError as exc:
        text = str(exc)
        assert text and "\n" not in text and len(text) <= S.MAX_ERROR_LEN
        return None
    _check_bounds(event, out)
    return out


@pytest.mark.parametrize("event", sorted(VALID))
@_FUZZ
@given(data=_json)
def test_fuzz_arbitrary_payloads_are_refused_or_within_bounds(event, data):
    _parse_or_refuse(event, data)


@pytest.mark.parametrize("event", sorted(VALID))
@_FUZZ
@given(choice=st.data())
def test_fuzz_one_field_replaced_is_refused_or_within_bounds(event, choice):
    data = dict(VALID[event])
    field = choice.draw(st.sampled_from(sorted(S.MODELS[event].model_fields)), label="field")
    data[field] = choice.draw(_json, label="value")
    _parse_or_refuse(event, data)


_stat_entries = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.integers(-5, 2000),
                          st.text(max_size=3), st.none())


@_FUZZ
@given(n=st.integers(-1, 4), rows=st.lists(st.lists(_stat_entries, max_size=4), max_size=4),
       flags=st.lists(st.lists(_stat_entries, max_size=4), max_size=4),
       gts=st.lists(_stat_entries, max_size=4), coco=st.booleans())
def test_fuzz_detection_statistics_are_refused_or_consistent(n, rows, flags, gts, coco):
    stats = {"num_classes": n, "scores": rows, "true_positive": flags, "num_ground_truth": gts}
    if coco:
        stats.update(coco_scores=rows, coco_true_positive=flags, coco_ignored=flags)
    out = _parse_or_refuse(EV, _with(EV, stats=stats))
    if out is not None:  # what the schema accepts, the server's DetectionStats accepts too
        from fedplug.types import DetectionStats

        DetectionStats.from_json(out["stats"])


@_FUZZ
@given(data=_json)
def test_fuzz_auth_payloads_are_refused_or_bounded(data):
    try:
        out = S.parse_auth(data)
    except P.ProtocolError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= S.MAX_ERROR_LEN
        return
    assert set(out) <= {"client_id", "secret", "token"}
    assert all(type(v) is str and 0 < len(v) <= S.MAX_SECRET_LEN for v in out.values())
