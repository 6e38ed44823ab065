"""Bounded schemas of every client -> server message (pydantic v2, strict), and :func:`parse`.

The server calls :func:`parse` on every message a client sends, before it acts
on it, and :func:`parse_auth` on the Socket.IO ``connect`` handler's ``auth``
payload; a message that fails raises :class:`fedplug.protocol.ProtocolError`
with one line naming the field, which the server sends back as
``protocol_error`` before dropping the message.

Strict means: no strings for numbers, no ``0``/``1`` for booleans, no floats
for integers; every string, list and object has a maximum size; every number
is finite and within a range.  The ranges are generous for real use and small
enough that no accepted value can overflow a sum (``train_loss`` at most 1e9,
sizes at most 1e9: a weighted sum of 10^4 clients stays finite).  Limits that
depend on the run (``train_size`` <= the client's declared ``num_train``,
``num_train`` <= ``server.max_client_examples``, the class count of ``stats``)
are the server's checks, after this one.  Unknown fields are ignored, for
forward compatibility; ``parse`` returns only the known ones.

Every bound is a constant below, listed in ``docs/protocol.md``.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Mapping, Optional

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, ValidationError, model_validator

from fedplug import protocol as P
from fedplug.protocol import ProtocolError

MAX_CLIENT_ID_LEN = P.MAX_CLIENT_ID_LEN  # 128
MAX_ROUND = 2**31 - 1
MAX_PROTOCOL_VERSION = 1000
MAX_EXAMPLES = 10**9  # num_train, num_test, train_size, test_size; server.max_client_examples is at most this
MAX_LOSS = 1e9  # |train_loss|, |test_loss|
MAX_SECONDS = 1e7  # client_update.seconds (about 115 days)
MAX_METRICS = P.MAX_METRICS  # 64 entries in metrics / details ...
MAX_METRIC_NAME = P.MAX_METRIC_NAME  # ... named with 1-64 printable characters
MAX_METRIC_VALUE = 1e15  # |value| of a metric or resource detail
MAX_INFO_ENTRIES = 32  # client_wake_up.info
MAX_INFO_VALUE_LEN = 256
MAX_TEXT_LEN = 64  # a string value in check_client_resource_done.details (e.g. kind)
MAX_SECRET_LEN = 256  # token, secret
MAX_REASON_LEN = P.MAX_REASON_LEN  # 2000: a longer reason is cut there (not refused)
MAX_CLASSES = 10_000  # stats.num_classes
MAX_STATS_ENTRIES = 10_000_000  # detections over all classes, per stats list
COCO_MASK_LIMIT = 1 << 10  # COCO flags: 10 bits, one per IoU threshold
MAX_ERROR_LEN = 300  # a ProtocolError's text
# protocol v2 transfers (fedplug/transfer.py; the server checks sizes against the model's, after this)
MAX_TRANSFER_ID_LEN = 256  # upload_id, weights_id, weights_ref
MAX_CHUNK_BYTES = 64 << 20  # upload_chunk.data (transfer.MAX_CHUNK_BYTES)
MAX_UPLOAD_BYTES = 1 << 40  # begin_upload.size
MAX_CHUNK_INDEX = 2**31 - 1

_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True, hide_input_in_errors=False)


# ---------------------------------------------------------------------- field types


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must hold printable characters only")
    return value


def _bounded_reason(value: str) -> str:
    """Cut to MAX_REASON_LEN and make it one printable line: a reason goes into logs and events.jsonl."""
    if len(value) > MAX_REASON_LEN:
        value = value[:MAX_REASON_LEN] + " [...]"
    if not value.isprintable():
        value = "".join(c if c.isprintable() else (" " if c in "\t\r\n" else "\ufffd") for c in value)
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite_number(value: Any, limit: float, what: str) -> float:
    if not _is_number(value):
        raise ValueError(f"{what} must be a number, got {_kind(value)}")
    if isinstance(value, int) and abs(value) > limit:
        raise ValueError(f"{what} must be within [-{limit:g}, {limit:g}], got {_short(value)}")
    number = float(value)
    if not math.isfinite(number) or abs(number) > limit:
        raise ValueError(f"{what} must be a finite number within [-{limit:g}, {limit:g}], got {_short(value)}")
    return number


def _name(key: Any, what: str, limit: int = MAX_METRIC_NAME) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= limit or not key.isprintable():
        raise ValueError(f"{what} names must be 1-{limit} printable characters, got {_short(key)}")
    return key


def _object(value: Any, limit: int, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be an object, got {_kind(value)}")
    if len(value) > limit:
        raise ValueError(f"may hold at most {limit} {what}, got {len(value)}")
    return value


def _metrics(value: Any) -> dict[str, float]:
    """Named finite numbers (client_update.metrics, client_eval.metrics)."""
    return {_name(k, "metric"): _finite_number(v, MAX_METRIC_VALUE, f"metric {_short(k)}")
            for k, v in _object(value, MAX_METRICS, "entries").items()}


def _details(value: Any) -> dict[str, float | str]:
    """A load report's details: named finite numbers, or short strings (such as ``kind``)."""
    out: dict[str, float | str] = {}
    for k, v in _object(value, MAX_METRICS, "entries").items():
        name = _name(k, "detail")
        if isinstance(v, str):
            if len(v) > MAX_TEXT_LEN or not v.isprintable():
                raise ValueError(f"detail {name!r} must be a number or 0-{MAX_TEXT_LEN} printable characters")
            out[name] = v
        else:
            out[name] = _finite_number(v, MAX_METRIC_VALUE, f"detail {name!r}")
    return out


def _info(value: Any) -> dict[str, Any]:
    """client_wake_up.info: a few named scalars describing the client (device, host, versions)."""
    out: dict[str, Any] = {}
    for k, v in _object(value, MAX_INFO_ENTRIES, "entries").items():
        name = _name(k, "info")
        if v is None or isinstance(v, bool):
            out[name] = v
        elif isinstance(v, str):
            if len(v) > MAX_INFO_VALUE_LEN or not v.isprintable():
                raise ValueError(f"info {name!r} must be at most {MAX_INFO_VALUE_LEN} printable characters")
            out[name] = v
        else:
            out[name] = _finite_number(v, MAX_METRIC_VALUE, f"info {name!r}")
    return out


ClientId = Annotated[str, Field(min_length=1, max_length=MAX_CLIENT_ID_LEN), AfterValidator(_printable)]
RoundNumber = Annotated[int, Field(ge=0, le=MAX_ROUND)]
Count = Annotated[int, Field(ge=0, le=MAX_EXAMPLES)]
Loss = Annotated[float, Field(ge=-MAX_LOSS, le=MAX_LOSS)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0, le=MAX_SECONDS)]
Reason = Annotated[str, AfterValidator(_bounded_reason)]
Secret = Annotated[str, Field(min_length=1, max_length=MAX_SECRET_LEN), AfterValidator(_printable)]
Metrics = Annotated[Any, AfterValidator(_metrics)]
Details = Annotated[Any, AfterValidator(_details)]
Info = Annotated[Any, AfterValidator(_info)]
Score = Annotated[float, Field(allow_inf_nan=False)]  # any finite number: AP uses only the order of scores
CocoMask = Annotated[int, Field(ge=0, lt=COCO_MASK_LIMIT)]
PerClass = Field(max_length=MAX_CLASSES)
TransferId = Annotated[str, Field(min_length=1, max_length=MAX_TRANSFER_ID_LEN), AfterValidator(_printable)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
ChunkIndex = Annotated[int, Field(ge=0, le=MAX_CHUNK_INDEX)]


class _Message(BaseModel):
    model_config = _CONFIG


# ---------------------------------------------------------------------- the messages


class ClientWakeUp(_Message):
    client_id: ClientId
    protocol_version: Annotated[int, Field(ge=0, le=MAX_PROTOCOL_VERSION)]
    token: Optional[Annotated[str, Field(max_length=MAX_SECRET_LEN), AfterValidator(_printable)]] = None
    info: Optional[Info] = None


class ClientReady(_Message):
    client_id: ClientId
    num_train: Count
    num_test: Count


class CheckClientResourceDone(_Message):
    round_number: RoundNumber
    load_rate: Fraction
    details: Optional[Details] = None
    reason: Optional[Reason] = None


class ClientUpdate(_Message):
    round_number: RoundNumber
    ok: StrictBool
    weights: Optional[bytes] = None  # v1: the model inline
    weights_ref: Optional[TransferId] = None  # v2: the upload_id of a finished upload
    train_size: Count
    train_loss: Loss
    reason: Optional[Reason] = None
    seconds: Optional[Seconds] = None
    metrics: Optional[Metrics] = None

    @model_validator(mode="after")
    def _weights_when_ok(self) -> "ClientUpdate":
        if self.ok and not self.weights and not self.weights_ref:
            raise ValueError("ok=true requires binary 'weights' (v1) or 'weights_ref' (v2)")
        if self.weights and self.weights_ref:
            raise ValueError("send either 'weights' or 'weights_ref', not both")
        return self


class BeginUpload(_Message):
    round_number: RoundNumber
    size: Annotated[int, Field(ge=1, le=MAX_UPLOAD_BYTES)]
    sha256: Sha256


class UploadChunk(_Message):
    upload_id: TransferId
    index: ChunkIndex
    data: Annotated[bytes, Field(max_length=MAX_CHUNK_BYTES)]
    sha256: Sha256


class FetchChunk(_Message):
    weights_id: TransferId
    index: ChunkIndex


SessionId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
PublicKey = Annotated[bytes, Field(min_length=32, max_length=32)]  # X25519, raw
MAX_ENVELOPE_BYTES = 512  # one sealed pair of Shamir shares is 2 + 2 * 66 + 16 = 150 bytes
MAX_SHARE_BYTES = 66  # a share's y over GF(2^521 - 1)
MAX_SECAGG_PEERS = 10_000  # envelopes or shares in one message (at most the neighbourhood)


class _SecAggAnswer(_Message):
    round_number: RoundNumber
    session: SessionId
    ok: StrictBool
    reason: Optional[Reason] = None


class SecAggKeys(_SecAggAnswer):
    c_pk: Optional[PublicKey] = None
    s_pk: Optional[PublicKey] = None

    @model_validator(mode="after")
    def _keys_when_ok(self) -> "SecAggKeys":
        if self.ok and (self.c_pk is None or self.s_pk is None):
            raise ValueError("ok=true requires c_pk and s_pk (32 raw bytes each)")
        return self


class SecAggShares(_SecAggAnswer):
    envelopes: Optional[Annotated[dict[ClientId, Annotated[bytes, Field(min_length=1, max_length=MAX_ENVELOPE_BYTES)]],
                                  Field(max_length=MAX_SECAGG_PEERS)]] = None

    @model_validator(mode="after")
    def _envelopes_when_ok(self) -> "SecAggShares":
        if self.ok and self.envelopes is None:
            raise ValueError("ok=true requires envelopes (neighbour id -> bytes)")
        return self


class UnmaskShare(_Message):
    kind: Literal["b", "s"]
    x: Annotated[int, Field(ge=1, le=MAX_SECAGG_PEERS)]
    y: Annotated[bytes, Field(min_length=MAX_SHARE_BYTES, max_length=MAX_SHARE_BYTES)]


class SecAggUnmaskShares(_SecAggAnswer):
    shares: Optional[Annotated[dict[ClientId, UnmaskShare], Field(max_length=MAX_SECAGG_PEERS)]] = None

    @model_validator(mode="after")
    def _shares_when_ok(self) -> "SecAggUnmaskShares":
        if self.ok and self.shares is None:
            raise ValueError("ok=true requires shares (client id -> {kind, x, y})")
        return self


def _total_entries(data: Any, field: str) -> int:
    rows = data.get(field) if isinstance(data, Mapping) else None
    if not isinstance(rows, list):
        return 0
    return sum(len(row) for row in rows if isinstance(row, list))


class Stats(_Message):
    """Per-class detection statistics (``fedplug.types.DetectionStats``; ``docs/metrics.md``)."""

    num_classes: Annotated[int, Field(ge=0, le=MAX_CLASSES)]
    scores: Annotated[list[list[Score]], PerClass]
    true_positive: Annotated[list[list[StrictBool]], PerClass]
    num_ground_truth: Annotated[list[Count], PerClass]
    coco_scores: Optional[Annotated[list[list[Score]], PerClass]] = None
    coco_true_positive: Optional[Annotated[list[list[CocoMask]], PerClass]] = None
    coco_ignored: Optional[Annotated[list[list[CocoMask]], PerClass]] = None

    @model_validator(mode="before")
    @classmethod
    def _bounded_total(cls, data: Any) -> Any:
        # before the entries are validated one by one: a stats object of 10^8 detections costs no work
        for field in ("scores", "coco_scores"):
            total = _total_entries(data, field)
            if total > MAX_STATS_ENTRIES:
                raise ValueError(f"{field} may hold at most {MAX_STATS_ENTRIES} detections in all, got {total}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "Stats":
        n = self.num_classes
        if not len(self.scores) == len(self.true_positive) == len(self.num_ground_truth) == n:
            raise ValueError(f"scores, true_positive and num_ground_truth must each list {n} classes "
                             "(num_classes)")
        for c, (s, t, g) in enumerate(zip(self.scores, self.true_positive, self.num_ground_truth)):
            if len(s) != len(t):
                raise ValueError(f"class {c}: {len(s)} scores but {len(t)} true_positive flags")
            if sum(t) > g:
                raise ValueError(f"class {c}: {sum(t)} true positives but only {g} ground-truth boxes")
        coco = (self.coco_scores, self.coco_true_positive, self.coco_ignored)
        if any(x is not None for x in coco):
            if any(x is None for x in coco):
                raise ValueError("either all or none of coco_scores, coco_true_positive, coco_ignored")
            if not len(coco[0]) == len(coco[1]) == len(coco[2]) == n:
                raise ValueError(f"the coco_ lists must each list {n} classes (num_classes)")
            for c, (s, t, i) in enumerate(zip(*coco)):
                if not len(s) == len(t) == len(i):
                    raise ValueError(f"class {c}: the coco_ lists disagree in length")
        return self


class ClientEval(_Message):
    round_number: RoundNumber
    ok: StrictBool
    test_size: Count
    test_loss: Loss
    test_map: Fraction
    test_recall: Fraction
    stats: Optional[Stats] = None
    metrics: Optional[Metrics] = None
    reason: Optional[Reason] = None


class Auth(_Message):
    """The Socket.IO ``connect`` ``auth`` payload: ``{client_id, secret}`` (per-site) or ``{token}``."""

    client_id: Optional[ClientId] = None
    secret: Optional[Secret] = None
    token: Optional[Secret] = None


MODELS: dict[str, type[_Message]] = {
    P.CLIENT_WAKE_UP: ClientWakeUp,
    P.CLIENT_READY: ClientReady,
    P.CHECK_CLIENT_RESOURCE_DONE: CheckClientResourceDone,
    P.CLIENT_UPDATE: ClientUpdate,
    P.CLIENT_EVAL: ClientEval,
    P.BEGIN_UPLOAD: BeginUpload,
    P.UPLOAD_CHUNK: UploadChunk,
    P.FETCH_CHUNK: FetchChunk,
    P.SECAGG_KEYS: SecAggKeys,
    P.SECAGG_SHARES: SecAggShares,
    P.SECAGG_UNMASK_SHARES: SecAggUnmaskShares,
}
AUTH = "connect"  # the event name parse_auth's errors carry


# ---------------------------------------------------------------------- parse


def parse(event: str, data: Any) -> dict[str, Any]:
    """Validate a client -> server message; return its known fields (None ones left out) as a dict.

    Raises :class:`~fedplug.protocol.ProtocolError` with one line (at most
    300 characters) naming the event and the first bad field.
    """
    model = MODELS.get(event) if isinstance(event, str) else None
    if model is None:
        raise ProtocolError(f"unknown event {_short(event)}")
    return _validate(event, model, data)


def parse_auth(data: Any) -> dict[str, Any]:
    """Validate a ``connect`` ``auth`` payload (None: no credentials given)."""
    return _validate(AUTH, Auth, {} if data is None else data)


def _validate(event: str, model: type[_Message], data: Any) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"{event}: payload must be an object, got {_kind(data)}")
    try:
        message = model.model_validate(dict(data))
    except ValidationError as exc:
        raise ProtocolError(_one_line(event, model, exc)) from None
    return {name: _plain_value(getattr(message, name))
            for name in model.model_fields if getattr(message, name) is not None}


def _plain_value(value: Any) -> Any:
    """Nested message models (stats, unmask shares) as plain dicts: handlers see JSON-like values only."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_none=True)
    if isinstance(value, dict):
        return {k: _plain_value(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------- error text

_KINDS = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
          "string_type": "a string", "bytes_type": "binary (a Socket.IO attachment)", "dict_type": "an object",
          "list_type": "a list", "model_type": "an object", "model_attributes_type": "an object"}


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", bytes: "binary",
             bytearray: "binary", list: "a list", tuple: "a list", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    """A bounded rendering of a peer's value for an error message."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 64:
            return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = value[:limit] + ("..." if len(value) > limit else "")
        return repr(text)
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    if isinstance(value, (list, tuple, dict)):
        return f"{_kind(value)} of {len(value)}"
    return type(value).__name__


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _bounds(model: type[_Message], loc: tuple) -> tuple[Any, Any]:
    """The (lower, upper) bounds declared on a top-level field, for a message that states both."""
    if len(loc) != 1 or loc[0] not in model.model_fields:
        return None, None
    low = high = None
    for meta in model.model_fields[loc[0]].metadata:
        if isinstance(meta, (Ge, Gt)):
            low = meta.ge if isinstance(meta, Ge) else meta.gt
        if isinstance(meta, (Le, Lt)):
            high = meta.le if isinstance(meta, Le) else meta.lt
    return low, high


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _one_line(event: str, model: type[_Message], exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc, typ, ctx = tuple(err.get("loc") or ()), err.get("type", ""), err.get("ctx") or {}
    value = err.get("input")
    field = _where(loc)
    if typ == "missing":
        text = f"missing field {field!r}"
    elif typ in ("value_error", "assertion_error"):
        reason = str(ctx.get("error", err.get("msg", "")))
        text = f"field {field!r}: {reason}" if field else reason
    elif typ == "float_type" and isinstance(value, int) and not isinstance(value, bool):
        text = f"field {field!r} must be a number in range, got {_short(value)}"
    elif typ in _KINDS:
        text = f"field {field!r} must be {_KINDS[typ]}, got {_kind(value)}"
    elif typ in ("finite_number",):
        text = f"field {field!r} must be finite, got {_short(value)}"
    elif typ in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        low, high = _bounds(model, loc)
        if typ == "greater_than_equal" and ctx.get("ge") == 0:
            text = f"field {field!r} must not be negative, got {_short(value)}"
        elif low is not None and high is not None:
            text = f"field {field!r} must be within [{_fmt(low)}, {_fmt(high)}], got {_short(value)}"
        else:
            bound = next(iter(ctx.items()), ("", ""))
            sign = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}.get(bound[0], "")
            text = f"field {field!r} must be {sign} {_fmt(bound[1])}, got {_short(value)}"
    elif typ == "string_too_short":
        text = f"field {field!r} must not be empty" if ctx.get("min_length") == 1 else \
            f"field {field!r} must have at least {ctx.get('min_length')} characters"
    elif typ == "string_too_long":
        text = f"field {field!r} must be at most {ctx.get('max_length')} characters, got {len(value)}" \
            if isinstance(value, str) else f"field {field!r} must be at most {ctx.get('max_length')} characters"
    elif typ == "string_pattern_mismatch":
        text = f"field {field!r} must be 64 lower-case hex digits (a SHA-256)" if "0-9a-f" in str(ctx) \
            else f"field {field!r} does not match {ctx.get('pattern')}"
    elif typ in ("bytes_too_long",):
        text = f"field {field!r} may hold at most {ctx.get('max_length')} bytes, got {_short(value)}"
    elif typ in ("too_long", "too_short"):
        limit = ctx.get("max_length", ctx.get("min_length"))
        text = f"field {field!r} may hold at most {limit} entries, got {ctx.get('actual_length')}" \
            if typ == "too_long" else f"field {field!r} needs at least {limit} entries"
    else:
        text = f"field {field!r}: {err.get('msg', typ)}"
    line = f"{event}: {text}".replace("\n", " ")
    return line if len(line) <= MAX_ERROR_LEN else line[:MAX_ERROR_LEN - 3] + "..."
