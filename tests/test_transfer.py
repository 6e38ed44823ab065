"""Protocol v2/v3 transfers (fedplug/transfer.py): chunk bookkeeping, integrity, resumption."""

import asyncio
import hashlib
import os

import pytest

from fedplug.transfer import (Downloads, TransferError, Uploads, download, num_chunks, sha256_hex,
                              upload)


def _blob(n: int) -> bytes:
    return os.urandom(n)


def _list_digest(data: bytes, chunk: int) -> str:
    """Protocol 3's sha256, computed the way docs/protocol.md defines it (not with fedplug's helpers)."""
    parts = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    return hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).hexdigest()


def _declared(data: bytes, chunk: int, version: int) -> str:
    return _list_digest(data, chunk) if version >= 3 else sha256_hex(data)


def test_a_download_is_served_in_chunks_of_one_shared_blob():
    downloads = Downloads(chunk_bytes=1000)
    data = _blob(2500)
    blob = downloads.offer(data, "r1-global")
    assert blob.ref(2) == {"id": blob.id, "size": 2500, "sha256": hashlib.sha256(data).hexdigest(),
                           "chunk_bytes": 1000, "num_chunks": 3}
    assert blob.ref(3) == dict(blob.ref(2), sha256=_list_digest(data, 1000))  # the chunk-list digest
    assert _list_digest(data, 1000) != hashlib.sha256(data).hexdigest()
    parts = [downloads.chunk(blob.id, i)[0] for i in range(3)]
    assert [len(p) for p in parts] == [1000, 1000, 500] and b"".join(parts) == data
    assert downloads.offer(data, "r1-global") is blob  # offered twice: the same bytes, no copy
    with pytest.raises(TransferError, match="does not exist"):
        downloads.chunk(blob.id, 3)
    with pytest.raises(TransferError, match="not offered"):
        downloads.chunk("r9-global-nope", 0)
    with pytest.raises(TransferError, match="integer"):
        downloads.chunk(blob.id, "0")


def test_old_blobs_are_forgotten():
    downloads = Downloads(chunk_bytes=10, keep=2)
    ids = [downloads.offer(_blob(20), f"r{i}").id for i in range(3)]
    with pytest.raises(TransferError):
        downloads.chunk(ids[0], 0)
    assert downloads.chunk(ids[2], 0)[0]


@pytest.mark.parametrize("version", [2, 3])
def test_an_upload_accepts_chunks_in_order_once_each_and_checks_every_hash(tmp_path, version):
    uploads = Uploads(chunk_bytes=100, max_bytes=1000, spill_dir=tmp_path / "up")
    data = _blob(250)
    up = uploads.begin("site1", 3, len(data), _declared(data, 100, version), version)
    chunks = [data[i:i + 100] for i in range(0, 250, 100)]
    with pytest.raises(TransferError, match="out of order; send chunk 0"):
        up.accept(1, chunks[1], sha256_hex(chunks[1]))
    with pytest.raises(TransferError, match="sha256"):
        up.accept(0, chunks[0], sha256_hex(b"other"))
    with pytest.raises(TransferError, match="must be 100 bytes"):
        up.accept(0, chunks[0][:99], sha256_hex(chunks[0][:99]))
    assert up.accept(0, chunks[0], sha256_hex(chunks[0])) == 1
    assert up.accept(0, chunks[0], sha256_hex(chunks[0])) == 1  # a re-send after a lost ack: no harm
    with pytest.raises(TransferError, match="incomplete: 1 of 3"):
        uploads.take("site1", up.id, 3)
    for i in (1, 2):
        up.accept(i, chunks[i], sha256_hex(chunks[i]))
    with pytest.raises(TransferError, match="round 3, not 4"):
        uploads.take("site1", up.id, 4)
    path = uploads.take("site1", up.id, 3)
    assert path.read_bytes() == data and path.parent == tmp_path / "up"
    with pytest.raises(TransferError, match="no open upload"):
        uploads.take("site1", up.id, 3)


def test_an_upload_is_bounded_and_resumed_by_round_and_hash(tmp_path):
    uploads = Uploads(chunk_bytes=100, max_bytes=1000, spill_dir=tmp_path)
    for size in (0, 1001, 10**30, "5", True):
        with pytest.raises(TransferError, match="size must be an integer in 1..1000"):
            uploads.begin("a", 1, size, "0" * 64)
    with pytest.raises(TransferError, match="64 lower-case hex"):
        uploads.begin("a", 1, 10, "xyz")
    data = _blob(300)
    first = uploads.begin("a", 1, 300, sha256_hex(data))
    first.accept(0, data[:100], sha256_hex(data[:100]))
    again = uploads.begin("a", 1, 300, sha256_hex(data))  # after a reconnect
    assert again is first and again.next_index == 1
    other = uploads.begin("a", 1, 300, sha256_hex(b"x" * 300))  # a different model replaces it
    assert other is not first and other.next_index == 0 and len(uploads) == 1
    uploads.begin("b", 2, 10, "0" * 64)
    uploads.drop_before(2)  # round 1 ended: its upload's file is removed
    assert len(uploads) == 1 and not other.path.exists() and not first.path.exists()
    with pytest.raises(TransferError):
        uploads.get("a", other.id)


@pytest.mark.parametrize("version", [2, 3])
def test_a_corrupted_whole_upload_is_refused(tmp_path, version):
    uploads = Uploads(chunk_bytes=100, max_bytes=1000, spill_dir=tmp_path)
    data = _blob(150)
    up = uploads.begin("a", 1, 150, _declared(b"\0" * 150, 100, version), version)  # declares another hash
    up.accept(0, data[:100], sha256_hex(data[:100]))
    up.accept(1, data[100:], sha256_hex(data[100:]))
    with pytest.raises(TransferError, match="does not match the sha256 declared"):
        uploads.take("a", up.id, 1)
    assert not up.path.exists()


class FlakyPeer:
    """A server stand-in reached through ``call``; drops every ``drop_every``-th call as a cut link would."""

    def __init__(self, chunk_bytes=64, drop_every=0, version=3):
        self.version = version
        self.downloads = Downloads(chunk_bytes)
        self.uploads = Uploads(chunk_bytes, max_bytes=10**6)  # spills to a fresh temp dir
        self.calls = 0
        self.drop_every = drop_every
        self.dropped = 0

    async def call(self, event, payload):
        for _ in range(10):  # what FederationClient._call does: ask again after a failure
            self.calls += 1
            if self.drop_every and self.calls % self.drop_every == 0:
                self.dropped += 1
                continue  # the request (or its ack) was lost
            return self.handle(event, payload)
        raise AssertionError("too many drops")

    def handle(self, event, p):
        try:
            if event == "fetch_chunk":
                data, _ = self.downloads.chunk(p["weights_id"], p["index"])
                return {"ok": True, "data": data, "sha256": sha256_hex(data)}
            if event == "begin_upload":
                up = self.uploads.begin("c", p["round_number"], p["size"], p["sha256"], self.version)
                return {"ok": True, "upload_id": up.id, "chunk_bytes": up.chunk_bytes, "next_index": up.next_index}
            if event == "upload_chunk":
                up = self.uploads.get("c", p["upload_id"])
                return {"ok": True, "next_index": up.accept(p["index"], p["data"], p["sha256"])}
        except TransferError as exc:
            return {"ok": False, "reason": str(exc)}
        raise AssertionError(event)


@pytest.mark.parametrize("version", [2, 3])
def test_download_and_upload_survive_lost_calls_and_report_progress(version):
    peer = FlakyPeer(chunk_bytes=64, drop_every=3, version=version)
    data = _blob(1000)
    ref = peer.downloads.offer(data, "r1").ref(version)
    assert ref["sha256"] == _declared(data, 64, version)
    seen = []
    got = asyncio.run(download(peer.call, ref, max_bytes=10**6, progress=lambda done, total: seen.append(done),
                               version=version))
    assert got == data and seen[-1] == 1000 and len(seen) == num_chunks(1000, 64)
    upload_id = asyncio.run(upload(peer.call, data, 1, version=version, chunk_bytes=64))
    assert peer.dropped > 3
    assert peer.uploads.take("c", upload_id, 1).read_bytes() == data


def test_a_download_checks_what_it_got():
    peer = FlakyPeer(chunk_bytes=64)
    data = _blob(200)
    ref = peer.downloads.offer(data, "r1").ref()
    with pytest.raises(TransferError, match="over this client's limit"):
        asyncio.run(download(peer.call, ref, max_bytes=100))
    lying = dict(ref, sha256="0" * 64)
    with pytest.raises(TransferError, match="do not match their sha256"):
        asyncio.run(download(peer.call, lying, max_bytes=10**6))
    with pytest.raises(TransferError, match="refused by the server"):
        asyncio.run(download(peer.call, dict(ref, id="gone"), max_bytes=10**6))
    for bad in (None, {"id": 1}, dict(ref, size="200"), dict(ref, chunk_bytes=0)):
        with pytest.raises(TransferError):
            asyncio.run(download(peer.call, bad, max_bytes=10**6))


def test_an_upload_the_server_lost_starts_again():
    peer = FlakyPeer(chunk_bytes=64)
    data = _blob(300)
    real = peer.handle
    state = {"lost": False}

    def forgetful(event, p):
        if event == "upload_chunk" and p["index"] == 2 and not state["lost"]:
            state["lost"] = True  # e.g. the server restarted: the partial upload is gone
            peer.uploads.drop_before(10)
            return {"ok": False, "restart": True, "reason": "no open upload"}
        return real(event, p)

    peer.handle = forgetful
    upload_id = asyncio.run(upload(peer.call, data, 1, chunk_bytes=64))
    assert state["lost"] and peer.uploads.take("c", upload_id, 1).read_bytes() == data


def test_a_layout_is_a_valid_safetensors_file_served_without_a_model_sized_buffer():
    import torch
    from safetensors.torch import load

    from fedplug.wire import SafetensorsLayout

    state = {"b.w": torch.randn(30, 7), "a": torch.arange(11), "h": torch.randn(5).half(),
             "m": torch.tensor([True, False]), "bf": torch.randn(3).bfloat16(), "empty": torch.zeros(0)}
    layout = SafetensorsLayout(state)
    whole = layout.to_bytes()
    assert len(whole) == layout.size and layout.sha256() == hashlib.sha256(whole).hexdigest()
    assert all(torch.equal(load(whole)[k], v) for k, v in state.items())
    downloads = Downloads(chunk_bytes=50)
    blob = downloads.offer(layout, "r1")
    assert b"".join(blob.chunk(i) for i in range(blob.num_chunks)) == whole and blob.data == whole


def test_a_received_file_is_mapped_checked_and_refused_precisely(tmp_path):
    import struct

    import torch

    from fedplug.wire import WireError, encode_state, open_checked, spec_of

    state = {"w": torch.randn(4, 3), "n": torch.tensor(7)}
    spec = spec_of(state)
    good = tmp_path / "good.part"
    good.write_bytes(encode_state(state))
    got = open_checked(good, spec)
    assert all(torch.equal(got[k], state[k]) for k in state) and not good.exists()

    def refused(data: bytes, match: str):
        path = tmp_path / "bad.part"
        path.write_bytes(data)
        with pytest.raises(WireError, match=match):
            open_checked(path, spec)

    raw = encode_state(state)
    refused(raw[:5], "not a safetensors file")
    refused(struct.pack("<Q", 10**12) + raw[8:], "header length")
    refused(struct.pack("<Q", 4) + b"nope" + raw[12:], "not JSON")
    nan = dict(state, w=torch.full((4, 3), float("nan")))
    refused(encode_state(nan), "NaN or Inf")
    refused(encode_state({"w": state["w"]}), "missing 1 tensor")
    refused(encode_state(dict(state, w=torch.randn(3, 4))), "shape")
    refused(encode_state(dict(state, w=state["w"].double())), "dtype")
    refused(raw + b"extra", "trailing bytes")


def test_a_layout_uploads_the_same_file_as_its_bytes_without_building_it():
    """The plain codec's update is a SafetensorsLayout: its upload must be the very file (both protocols)."""
    import torch

    from fedplug.wire import SafetensorsLayout

    state = {"w": torch.randn(100, 33), "b": torch.arange(7), "h": torch.randn(13).half()}
    layout = SafetensorsLayout(state)
    whole = layout.to_bytes()
    for version in (2, 3):
        peer = FlakyPeer(chunk_bytes=256, drop_every=4, version=version)
        upload_id = asyncio.run(upload(peer.call, layout, 2, version=version, chunk_bytes=256))
        assert peer.uploads.take("c", upload_id, 2).read_bytes() == whole


def test_a_v3_upload_needs_the_chunk_size_it_was_hashed_with():
    peer = FlakyPeer(chunk_bytes=64)
    with pytest.raises(TransferError, match="init.transfer.chunk_bytes"):
        asyncio.run(upload(peer.call, _blob(300), 1, version=3, chunk_bytes=None))
    with pytest.raises(TransferError, match="chunks of 64 bytes, not the 100"):
        asyncio.run(upload(peer.call, _blob(300), 1, version=3, chunk_bytes=100))


def test_a_v3_download_whose_chunks_are_each_right_but_not_the_announced_ones_is_refused():
    """Every chunk matches the hash sent with it, yet the chunk list is not what weights_ref named."""
    peer = FlakyPeer(chunk_bytes=64)
    announced = peer.downloads.offer(_blob(300), "r1").ref(3)
    other = peer.downloads.offer(_blob(300), "r2")
    with pytest.raises(TransferError, match="do not match their sha256"):
        asyncio.run(download(peer.call, dict(announced, id=other.id), max_bytes=10**6, version=3))
