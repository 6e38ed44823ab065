"""Protocol v2: model weights in chunks, each acknowledged, resumable after a reconnect.

Why chunks: Engine.IO heartbeats share the WebSocket with the weights.  A
20 MB frame on a 1 Mbit/s link takes 160 s, the peer's pong waits behind it,
and the connection is declared dead 25 s in — every round, for ever.  With
chunks of ``server.chunk_kb`` (default 1 MiB: 8 s at 1 Mbit/s) the
heartbeats interleave between chunks at any link speed that moves one chunk
within the ping timeout, no message approaches ``server.max_message_mb``, and
a transfer cut by a disconnect resumes from its last acknowledged chunk.

Both directions are pulled/pushed by the client, one chunk in flight at a
time, with Socket.IO acknowledgements (``sio.call``), so flow control is the
protocol itself: a slow link simply makes each acknowledgement arrive later.

- **Download** (``request_update`` / ``stop_and_eval``): the message carries
  ``weights_ref = {id, size, sha256, chunk_bytes, num_chunks}``; the client
  asks ``fetch_chunk {weights_id, index}`` for each chunk and checks each
  chunk's and the whole blob's SHA-256.
- **Upload** (``client_update``): ``begin_upload {round_number, size, sha256}``
  opens (or, after a reconnect, finds again) the client's upload and answers
  ``next_index``; ``upload_chunk {upload_id, index, data, sha256}`` sends the
  chunks in order; ``client_update`` then names the finished upload in
  ``weights_ref`` instead of carrying ``weights``.

**Version 3** is version 2 with one hash pass per byte instead of two: the ``sha256`` of a
``weights_ref`` or a ``begin_upload`` is the *chunk-list digest* -- the SHA-256 of the chunks'
32-byte SHA-256 digests, concatenated in order (:func:`list_sha256`) -- not a second hash of the
whole file.  Each chunk is still checked on arrival, and the list digest ties the chunks to what
was announced, so the integrity is the same; the second pass over every byte (on each end, each
direction) was a quarter of a detector-scale round's CPU.  Both directions use the chunk size of
``init.transfer.chunk_bytes``.

The server side (:class:`Downloads`, :class:`Uploads`) is plain bookkeeping
called on the event loop: hashing a chunk is microseconds per MiB-chunk, and
nothing here ever holds more than one model per client plus the round's
broadcast.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 64 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class TransferError(ValueError):
    """A chunk or transfer request that cannot be honoured; the text says why."""


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_HEX64.fullmatch(value))


def num_chunks(size: int, chunk_bytes: int) -> int:
    return max(1, -(-size // chunk_bytes))


def list_sha256(digests: list[bytes]) -> str:
    """The chunk-list digest of protocol 3: SHA-256 of the chunks' binary SHA-256 digests, in order."""
    return hashlib.sha256(b"".join(digests)).hexdigest()


def size_of(data: Any) -> int:
    """Bytes of ``data``: bytes-like, or a :class:`fedplug.wire.SafetensorsLayout` (``size``)."""
    return len(data) if isinstance(data, (bytes, bytearray, memoryview)) else int(data.size)


def read_chunk(data: Any, index: int, chunk_bytes: int) -> bytes:
    """Chunk ``index`` of ``data`` (bytes-like or a layout) as ``bytes``: one copy."""
    start = index * chunk_bytes
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(memoryview(data)[start:start + chunk_bytes])
    return data.read(start, chunk_bytes)


def _views_of(data: Any) -> list[memoryview]:
    return [memoryview(data).cast("B")] if isinstance(data, (bytes, bytearray, memoryview)) else data.views()


def chunk_digests(data: Any, chunk_bytes: int) -> list[bytes]:
    """The binary SHA-256 of each ``chunk_bytes`` chunk of ``data``, hashed in place (no chunk copies)."""
    digests: list[bytes] = []
    hasher, filled = hashlib.sha256(), 0
    for view in _views_of(data):
        while view:
            take = min(len(view), chunk_bytes - filled)
            hasher.update(view[:take])
            view, filled = view[take:], filled + take
            if filled == chunk_bytes:
                digests.append(hasher.digest())
                hasher, filled = hashlib.sha256(), 0
    if filled or not digests:
        digests.append(hasher.digest())
    return digests


def whole_sha256(data: Any) -> str:
    """The SHA-256 of all of ``data``'s bytes (protocol 2's whole-file hash), without joining them."""
    hasher = hashlib.sha256()
    for view in _views_of(data):
        hasher.update(view)
    return hasher.hexdigest()


def blob_sha256(data: Any, chunk_bytes: int, version: int) -> str:
    """The ``sha256`` a ``weights_ref`` or ``begin_upload`` of ``data`` carries in protocol ``version``."""
    return list_sha256(chunk_digests(data, chunk_bytes)) if version >= 3 else whole_sha256(data)


# ---------------------------------------------------------------------------------------------- server


@dataclass
class Blob:
    """One serialised model the server offers for download (a round's broadcast).

    ``source`` is ``bytes`` or anything with ``size``, ``read(start, length)``, ``views()``
    and ``to_bytes()`` -- a :class:`fedplug.wire.SafetensorsLayout`, which serves chunks
    straight from the global model's tensors, so a broadcast costs no model-sized buffer.
    Every chunk's digest is computed once, when the blob is offered, whatever K.
    """

    id: str
    source: Any
    chunk_bytes: int
    digests: list  # the binary SHA-256 of each chunk
    _bytes: bytes | None = None
    _whole: str | None = None

    @property
    def size(self) -> int:
        return size_of(self.source)

    @property
    def sha256(self) -> str:
        """The chunk-list digest (protocol 3)."""
        return list_sha256(self.digests)

    @property
    def whole_sha256(self) -> str:
        """The whole file's SHA-256, for protocol-2 peers only: computed on first use."""
        if self._whole is None:
            self._whole = whole_sha256(self.source)
        return self._whole

    @property
    def data(self) -> bytes:
        """The whole file (protocol-1 peers get it inline): built once, on first use."""
        if isinstance(self.source, (bytes, bytearray)):
            return bytes(self.source)
        if self._bytes is None:
            self._bytes = self.source.to_bytes()
        return self._bytes

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.size, self.chunk_bytes)

    def ref(self, version: int = 3) -> dict[str, Any]:
        """The ``weights_ref`` a peer speaking protocol ``version`` (2 or 3) is sent."""
        return {"id": self.id, "size": self.size, "sha256": self.sha256 if version >= 3 else self.whole_sha256,
                "chunk_bytes": self.chunk_bytes, "num_chunks": self.num_chunks}

    def chunk(self, index: int) -> bytes:
        if not 0 <= index < self.num_chunks:
            raise TransferError(f"chunk {index} of weights {self.id} does not exist "
                                f"(it has {self.num_chunks}: 0..{self.num_chunks - 1})")
        return read_chunk(self.source, index, self.chunk_bytes)

    def chunk_sha256(self, index: int) -> str:
        """The hex SHA-256 of chunk ``index`` (computed when the blob was offered)."""
        return self.digests[index].hex()


class Downloads:
    """The blobs the server currently offers: the latest few broadcasts, all other ids forgotten.

    A blob is serialised once per round and every client reads chunks of the
    same bytes: K clients cost no K copies.
    """

    def __init__(self, chunk_bytes: int, keep: int = 3):
        self.chunk_bytes = int(chunk_bytes)
        self.keep = keep
        self._blobs: dict[str, Blob] = {}

    def digests(self, data: Any) -> list[bytes]:
        """The chunk digests :meth:`offer` needs (one hash pass: ~0.1 s per 158 MiB, so a worker thread's job)."""
        return chunk_digests(data, self.chunk_bytes)

    def offer(self, data: Any, label: str, digests: list[bytes] | None = None) -> Blob:
        """Offer ``data`` (bytes or a layout); ``digests`` from :meth:`digests` when already computed."""
        if digests is None:
            digests = self.digests(data)
        blob_id = f"{label}-{list_sha256(digests)[:16]}"
        blob = self._blobs.get(blob_id)
        if blob is None:
            blob = self._blobs[blob_id] = Blob(blob_id, data, self.chunk_bytes, list(digests))
            while len(self._blobs) > self.keep:
                self._blobs.pop(next(iter(self._blobs)))
        return blob

    def chunk(self, blob_id: Any, index: Any) -> tuple[bytes, Blob]:
        blob = self._blobs.get(blob_id) if isinstance(blob_id, str) else None
        if blob is None:
            raise TransferError(f"weights {blob_id!r} are not offered (any more); wait for the next request")
        if isinstance(index, bool) or not isinstance(index, int):
            raise TransferError(f"fetch_chunk: index must be an integer, got {type(index).__name__}")
        return blob.chunk(index), blob


@dataclass
class Upload:
    """One client's model upload, written chunk by chunk into its own spill file (not into memory).

    Chunks arrive in order, so the SHA-256 of the whole is computed as they come.
    Spilling keeps the server's memory flat in the number of clients uploading at
    once: a finished upload is mapped by :func:`fedplug.wire.open_checked` and its
    pages are read by the aggregator, never copied into a model-sized buffer.
    """

    id: str
    client_id: str
    round_number: int
    size: int
    sha256: str
    chunk_bytes: int
    path: Path
    version: int = 3  # the protocol the client speaks: what ``sha256`` means (see the module's docstring)
    next_index: int = 0
    started: float = field(default_factory=time.monotonic)
    connection: str | None = None  # the socket that sent the latest chunk: a change is a resumption
    _fd: int | None = None
    _hasher: Any = field(default_factory=hashlib.sha256)  # protocol 2: the whole file's SHA-256, as it comes
    _digests: list = field(default_factory=list)  # protocol 3: each accepted chunk's binary SHA-256
    # accept() runs in the server's chunk threads (hashing and pwrite release the GIL, so the event
    # loop goes on reading other clients' chunks); the lock keeps a re-sent chunk from a replaced
    # connection, or a close, from racing it -- a write to a closed and reused descriptor would land
    # in another file
    _lock: Any = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._fd = os.open(self.path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)

    def discard(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    @property
    def num_chunks(self) -> int:
        return num_chunks(self.size, self.chunk_bytes)

    @property
    def received_bytes(self) -> int:
        return min(self.size, self.next_index * self.chunk_bytes)

    @property
    def complete(self) -> bool:
        return self.next_index >= self.num_chunks

    def accept(self, index: Any, data: Any, digest: Any) -> int:
        """Store chunk ``index``; return the next index wanted.  Idempotent for chunks already held.

        Thread-safe: the server calls it from a worker thread, one chunk per client at a time.
        """
        with self._lock:
            return self._accept(index, data, digest)

    def _accept(self, index: Any, data: Any, digest: Any) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise TransferError("upload_chunk: index must be an integer >= 0")
        if index < self.next_index:
            return self.next_index  # a re-send after a lost acknowledgement: already have it
        if index > self.next_index:
            raise TransferError(f"upload_chunk: chunk {index} is out of order; send chunk {self.next_index}")
        if not isinstance(data, (bytes, bytearray)):
            raise TransferError("upload_chunk: data must be binary")
        start = index * self.chunk_bytes
        expected = min(self.chunk_bytes, self.size - start)
        if len(data) != expected:
            raise TransferError(f"upload_chunk: chunk {index} must be {expected} bytes, got {len(data)}")
        chunk_digest = hashlib.sha256(data).digest()
        if not is_sha256(digest) or chunk_digest.hex() != digest:
            raise TransferError(f"upload_chunk: chunk {index} does not match its sha256 (corrupted in transit?)")
        if self._fd is None:
            raise TransferError(f"upload {self.id} was closed")
        try:
            os.pwrite(self._fd, data, start)
        except OSError as exc:  # e.g. the server's disk is full: the client's round fails, the server goes on
            raise TransferError(f"the server cannot store the upload ({exc.strerror or exc})") from None
        if self.version >= 3:
            self._digests.append(chunk_digest)
        else:
            self._hasher.update(data)
        self.next_index += 1
        return self.next_index

    def digest(self) -> str:
        """What the received chunks hash to, as ``begin_upload.sha256`` is defined in this upload's protocol."""
        return list_sha256(self._digests) if self.version >= 3 else self._hasher.hexdigest()


class Uploads:
    """Every client's open upload: at most one each, of at most ``max_bytes``.

    A client that reconnects and asks :meth:`begin` for the same round and
    SHA-256 gets its partial upload back, and goes on from ``next_index``.
    """

    def __init__(self, chunk_bytes: int, max_bytes: int, spill_dir: Path | None = None):
        self.chunk_bytes = int(chunk_bytes)
        self.max_bytes = int(max_bytes)
        self.spill_dir = Path(spill_dir) if spill_dir is not None else Path(tempfile.mkdtemp(prefix="fedplug-up-"))
        shutil.rmtree(self.spill_dir, ignore_errors=True)  # a crashed run's partial uploads are of no use
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._by_client: dict[str, Upload] = {}

    def begin(self, client_id: str, round_number: int, size: Any, digest: Any, version: int = 3) -> Upload:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= self.max_bytes:
            raise TransferError(f"begin_upload: size must be an integer in 1..{self.max_bytes} "
                                f"(the global model's size bound), got {size!r}")
        if not is_sha256(digest):
            raise TransferError("begin_upload: sha256 must be 64 lower-case hex digits")
        current = self._by_client.get(client_id)
        if current is not None and (current.round_number, current.size, current.sha256, current.version) == \
                (round_number, size, digest, version):
            return current  # resume
        upload_id = f"r{round_number}-{secrets.token_hex(8)}"
        try:
            upload = Upload(upload_id, client_id, round_number, size, digest, self.chunk_bytes,
                            self.spill_dir / f"{upload_id}.part", version)
        except OSError as exc:
            raise TransferError(f"begin_upload: the server cannot store an upload ({exc.strerror or exc})") from None
        if current is not None:
            current.discard()  # replaced: its file goes
        self._by_client[client_id] = upload
        return upload

    def get(self, client_id: str, upload_id: Any) -> Upload:
        upload = self._by_client.get(client_id)
        if upload is None or upload.id != upload_id:
            raise TransferError(f"no open upload {upload_id!r} for {client_id}; call begin_upload first")
        return upload

    def take(self, client_id: str, upload_id: Any, round_number: int) -> Path:
        """The finished upload's file (checked against the declared SHA-256); the caller owns it now."""
        upload = self.get(client_id, upload_id)
        if upload.round_number != round_number:
            raise TransferError(f"upload {upload_id} is for round {upload.round_number}, not {round_number}")
        if not upload.complete:
            raise TransferError(f"upload {upload_id} is incomplete: {upload.next_index} of "
                                f"{upload.num_chunks} chunks received")
        del self._by_client[client_id]
        upload.close()
        if upload.digest() != upload.sha256:
            upload.discard()
            raise TransferError(f"upload {upload_id} does not match the sha256 declared in begin_upload")
        return upload.path

    def drop_before(self, round_number: int) -> None:
        """Forget uploads of rounds that ended: their files are not kept into the next round."""
        for cid in [c for c, u in self._by_client.items() if u.round_number < round_number]:
            self._by_client.pop(cid).discard()

    def __len__(self) -> int:
        return len(self._by_client)


# ---------------------------------------------------------------------------------------------- client

Call = Callable[[str, dict], Awaitable[Any]]
Progress = Callable[[int, int], None]


def _answer(reply: Any, what: str) -> dict:
    if not isinstance(reply, dict):
        raise TransferError(f"{what}: the server's acknowledgement is not an object")
    if not reply.get("ok"):
        raise TransferError(f"{what}: refused by the server: {reply.get('reason', 'no reason given')}")
    return reply


async def download(call: Call, ref: Any, max_bytes: int, progress: Progress | None = None,
                   version: int = 3) -> bytearray:
    """Fetch the blob ``ref`` describes, chunk by chunk; ``call`` retries across reconnects.

    Returns the buffer the chunks were written into (not a ``bytes`` copy of it: the client
    decodes the tensors as views of it, see :func:`fedplug.wire.decode_checked`).

    Raises :class:`TransferError` for a refused or corrupt transfer.
    """
    if not isinstance(ref, dict) or not isinstance(ref.get("id"), str) or not is_sha256(ref.get("sha256")):
        raise TransferError("weights_ref must be an object with id (str) and sha256")
    size, chunk_bytes = ref.get("size"), ref.get("chunk_bytes")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (size, chunk_bytes)):
        raise TransferError("weights_ref.size and chunk_bytes must be positive integers")
    if size > max_bytes:
        raise TransferError(f"weights of {size} bytes are over this client's limit of {max_bytes}")
    buffer = bytearray(size)
    total = num_chunks(size, chunk_bytes)
    digests: list[bytes] = []
    for index in range(total):
        reply = _answer(await call("fetch_chunk", {"weights_id": ref["id"], "index": index}),
                        f"fetch_chunk {index}/{total}")
        data = reply.get("data")
        start = index * chunk_bytes
        expected = min(chunk_bytes, size - start)
        if not isinstance(data, (bytes, bytearray)) or len(data) != expected:
            raise TransferError(f"fetch_chunk {index}: expected {expected} bytes")
        digest = hashlib.sha256(data).digest()
        if reply.get("sha256") != digest.hex():
            raise TransferError(f"fetch_chunk {index}: the chunk does not match its sha256")
        digests.append(digest)
        buffer[start:start + expected] = data
        if progress is not None:
            progress(start + expected, size)
    if (list_sha256(digests) if version >= 3 else sha256_hex(buffer)) != ref["sha256"]:
        raise TransferError("the downloaded weights do not match their sha256")
    return buffer


async def upload(call: Call, data: Any, round_number: int, progress: Progress | None = None,
                 version: int = 3, chunk_bytes: int | None = None) -> str:
    """Send ``data`` (bytes or a layout) as the upload of ``round_number``; return the upload id.

    The id goes in ``client_update.weights_ref``.  Each chunk waits for its
    acknowledgement.  After a reconnect ``call`` resumes here, and ``begin_upload``
    (asked again) says where to go on from.  In protocol 3 ``chunk_bytes`` is
    ``init.transfer.chunk_bytes``: the chunks are hashed once, before the upload
    opens, and each chunk is sent with its digest from that pass.
    """
    size = size_of(data)
    if version >= 3:
        if not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
            raise TransferError("protocol 3 uploads need init.transfer.chunk_bytes (the server did not send it)")
        digests = chunk_digests(data, chunk_bytes)
        digest = list_sha256(digests)
    else:
        digests, digest = None, whole_sha256(data)
    while True:
        opened = _answer(await call("begin_upload", {"round_number": round_number, "size": size,
                                                     "sha256": digest}), "begin_upload")
        upload_id, served_chunk = opened.get("upload_id"), opened.get("chunk_bytes")
        index = opened.get("next_index")
        if not isinstance(upload_id, str) or not isinstance(served_chunk, int) or served_chunk <= 0 \
                or not isinstance(index, int) or index < 0:
            raise TransferError("begin_upload: malformed acknowledgement")
        if digests is not None and served_chunk != chunk_bytes:
            raise TransferError(f"begin_upload: the server takes chunks of {served_chunk} bytes, not the "
                                f"{chunk_bytes} of init.transfer.chunk_bytes the upload's sha256 was computed with")
        total = num_chunks(size, served_chunk)
        restart = False
        while index < total:
            chunk = read_chunk(data, index, served_chunk)
            reply = await call("upload_chunk", {"upload_id": upload_id, "index": index, "data": chunk,
                                                "sha256": digests[index].hex() if digests else sha256_hex(chunk)})
            if isinstance(reply, dict) and not reply.get("ok") and reply.get("restart"):
                restart = True  # the server lost the upload (e.g. it restarted): open it again
                break
            reply = _answer(reply, f"upload_chunk {index}/{total}")
            index = int(reply.get("next_index", index + 1))
            if progress is not None:
                progress(min(size, index * served_chunk), size)
        if not restart:
            return upload_id


async def pause_until(event: asyncio.Event, deadline: float) -> bool:
    """Wait for ``event`` until the monotonic ``deadline``; True when it is set."""
    left = deadline - time.monotonic()
    if left <= 0:
        return event.is_set()
    try:
        await asyncio.wait_for(event.wait(), left)
        return True
    except asyncio.TimeoutError:
        return False
