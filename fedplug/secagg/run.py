"""SecAgg+ inside a run: what the server and each client do with the ``secagg_*`` events of one round.

``protocol.py`` holds the cryptography as pure state machines; this module binds
them to the wire (docs/protocol.md, "Secure aggregation") and to FedAvg:

* :class:`SecureRound` -- the server's side of one round.  It relays public keys
  and sealed envelopes, adds each masked input (a safetensors file holding one
  ``uint64`` tensor, uploaded like a model) into a running sum without keeping
  it, and unmasks only the sum, from which :meth:`SecureRound.mean` makes the
  FedAvg mean.  The server's aggregator then sees that mean as the round's one
  update: it never holds an individual client's update.
* :class:`ClientSessions` -- a client's side: one :class:`SecAggClient` per
  round, answering each server request with the message the protocol asks for.

Settings (``secagg.*`` in conf/config.yaml) are checked by :func:`check_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from safetensors.numpy import save as st_save

from fedplug.secagg.masking import DEFAULT_FRAC_BITS
from fedplug.secagg.protocol import (SecAggClient, SecAggError, SecAggServer, fedavg_from_sum, fedavg_input,
                                     input_length)

MASKED_TENSOR = "secagg.masked"  # the one tensor of a masked upload
SESSION_KEY = "secagg_session"  # its safetensors __metadata__ names the session it was masked for
MAX_HEADER_BYTES = 1 << 16


def _read_masked(source: Path | bytes) -> tuple[dict, dict[str, tuple[str, list, int, int]], np.ndarray | None]:
    """A masked upload's header parsed once: ``(metadata, {name: (dtype, shape, start, end)}, the U64 data)``.

    The data is a read-only view of the file (``numpy.memmap``) or of the inline
    bytes, not a copy: a masked input is twice the model, and the server only
    adds it into its running sum.  Raises ``ValueError`` for a malformed file.
    """
    import json

    if isinstance(source, Path):
        size = source.stat().st_size
        with open(source, "rb") as f:
            head = f.read(8 + MAX_HEADER_BYTES)
    else:
        size, head = len(source), bytes(source[:8 + MAX_HEADER_BYTES])
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if not 0 < length <= len(head) - 8:
        raise ValueError(f"header length {length} is out of bounds")
    header = json.loads(head[8:8 + length])
    if not isinstance(header, dict):
        raise ValueError("the header is not an object")
    metadata = header.pop("__metadata__", None)
    entries = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("data_offsets"), list) \
                or len(entry["data_offsets"]) != 2:
            raise ValueError(f"entry {str(name)[:40]!r} is malformed")
        start, end = entry["data_offsets"]
        entries[name] = (entry.get("dtype"), entry.get("shape"), start, end)
    data = None
    entry = entries.get(MASKED_TENSOR)
    if len(entries) == 1 and entry is not None and entry[0] == "U64":
        _, _, start, end = entry
        offset = 8 + length + start
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end
                and (end - start) % 8 == 0 and offset + (end - start) == size):
            raise ValueError(f"{MASKED_TENSOR} spans {[start, end]}, which does not fit the file's {size} bytes")
        count = (end - start) // 8
        data = (np.memmap(source, dtype="<u8", mode="r", offset=offset, shape=(count,)) if isinstance(source, Path)
                else np.frombuffer(source, dtype="<u8", count=count, offset=offset))
    return metadata if isinstance(metadata, dict) else {}, entries, data


# aggregators whose result from the FedAvg mean of the round equals their result from the individual updates;
# robust ones (median, Krum) need each update, and the DP ones calibrate noise to each update's clipping
MEAN_AGGREGATORS = frozenset({"fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox"})


def default_threshold(num_clients: int, degree: int | None) -> int:
    """A majority of each client's neighbourhood (at least 2): fewer colluders than that learn nothing."""
    k = num_clients - 1 if degree is None else min(int(degree), num_clients - 1)
    return max(2, k // 2 + 1)


def check_config(secagg: Mapping[str, Any], aggregator: str, codec: str, clients_per_round: int) -> str | None:
    """Why these settings cannot run secure aggregation, or None."""
    if not secagg.get("enabled"):
        return None
    if aggregator not in MEAN_AGGREGATORS:
        return (f"secagg.enabled=true needs an aggregator that works from the round's mean update "
                f"({', '.join(sorted(MEAN_AGGREGATORS))}); {aggregator!r} needs each client's update, which secure "
                "aggregation hides from the server")
    if codec != "none":
        return f"secagg.enabled=true sends masked integers, which codec={codec} cannot compress: use codec=none"
    if clients_per_round < 3:
        return ("secagg.enabled=true needs run.clients_per_round >= 3: with two clients each one's update is the "
                "sum minus the other's")
    degree = secagg.get("degree")
    if degree is not None and (not isinstance(degree, int) or degree < 2 or degree % 2):
        return f"secagg.degree must be an even integer >= 2 (or null: every other client), got {degree!r}"
    threshold = secagg.get("threshold")
    if threshold is not None and (not isinstance(threshold, int) or threshold < 2):
        return f"secagg.threshold must be an integer >= 2 (or null: a majority of the neighbourhood), got {threshold!r}"
    frac_bits = secagg.get("frac_bits", DEFAULT_FRAC_BITS)
    if not isinstance(frac_bits, int) or not 8 <= frac_bits <= 40:
        return f"secagg.frac_bits must be an integer from 8 to 40, got {frac_bits!r}"
    timeout = secagg.get("timeout_s", 120)
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        return f"secagg.timeout_s must be a positive number of seconds, got {timeout!r}"
    return None


def masked_size_bound(global_weights: Mapping[str, torch.Tensor]) -> int:
    """The most bytes a masked upload of this model takes: 8 per value plus a small header."""
    return 8 * input_length(global_weights) + 4096


# ----------------------------------------------------------------------------- the server's side


class SecureRound:
    """One round's secure aggregation on the server, among the clients selected for it.

    Every ``take_*`` method raises :class:`SecAggError` for a message that does not
    fit the round (the server refuses it with that text); none of them stores a
    client's update.
    """

    def __init__(self, round_number: int, participants: list[str], global_weights: Mapping[str, torch.Tensor],
                 settings: Mapping[str, Any]):
        n = len(participants)
        degree = settings.get("degree")
        degree = None if degree is None or int(degree) >= n - 1 else int(degree)
        threshold = settings.get("threshold")
        threshold = default_threshold(n, degree) if threshold is None else min(int(threshold), n - 1)
        self.round_number = round_number
        self.core = SecAggServer(participants, input_length(global_weights), threshold, degree,
                                 int(settings.get("frac_bits", DEFAULT_FRAC_BITS)))
        self.session = self.core.session
        self.reported_examples = 0  # the survivors' client_update.train_size, checked against the unmasked n

    @property
    def threshold(self) -> int:
        return self.core.threshold

    def setup_for(self, cid: str) -> dict:
        """``secagg_setup``: what client ``cid`` needs to make its keys."""
        c = self.core
        return {"round_number": self.round_number, "session": c.session, "neighbours": list(c.neighbours[cid]),
                "threshold": c.threshold, "length": c.length, "frac_bits": c.frac_bits,
                "num_clients": len(c.participants)}

    def take_keys(self, cid: str, msg: Mapping[str, Any]) -> None:
        self.core.receive_keys({"client_id": cid, "c_pk": msg["c_pk"], "s_pk": msg["s_pk"]})

    def peer_keys_for(self, cid: str) -> dict:
        """``secagg_peer_keys``: the public keys of ``cid``'s neighbours that advertised theirs."""
        keys = {v: {"c_pk": c_pk, "s_pk": s_pk} for v, (c_pk, s_pk) in self.core.keys_for(cid).items()}
        return {"round_number": self.round_number, "session": self.session, "keys": keys}

    def take_shares(self, cid: str, msg: Mapping[str, Any]) -> None:
        envelopes = dict(msg["envelopes"])
        strangers = sorted(set(envelopes) - set(self.core.keys_for(cid)))
        if strangers:
            raise SecAggError(f"envelopes for {', '.join(map(repr, strangers[:3]))}, which are not neighbours of "
                              f"{cid!r} that advertised keys")
        if len(envelopes) < self.core.threshold:
            raise SecAggError(f"{len(envelopes)} envelope(s); the threshold is {self.core.threshold}")
        self.core.receive_shares(cid, envelopes)

    def envelopes_for(self, cid: str) -> dict:
        """The part of ``request_update`` that carries the envelopes addressed to ``cid``."""
        return {"session": self.session, "envelopes": self.core.envelopes_for(cid)}

    def take_masked(self, cid: str, source: Path | bytes, train_size: int = 0) -> None:
        """Add ``cid``'s masked input (an uploaded file, or inline bytes) to the running sum.

        ``train_size`` is what ``cid`` reported in ``client_update``: the unmasked
        example count must come out as the survivors' sum of it (:meth:`mean`).
        """
        try:
            metadata, entries, masked = _read_masked(source)
        except (OSError, ValueError) as exc:
            raise SecAggError(f"the masked input is not a safetensors file: {exc}") from None
        session = metadata.get(SESSION_KEY)
        if session != self.session:
            # masked for another session (a late answer from a failed attempt of this round): its masks
            # would not cancel in this sum
            which = f"belongs to session {str(session)[:20]!r}" if session is not None else \
                f"names no session (__metadata__ {SESSION_KEY!r})"
            raise SecAggError(f"the masked input {which}, not this round's {self.session}")
        if set(entries) != {MASKED_TENSOR}:
            raise SecAggError(f"a masked input holds exactly one tensor named {MASKED_TENSOR!r}, got "
                              f"{sorted(map(str, entries))[:3]}")
        dtype, shape, _, _ = entries[MASKED_TENSOR]
        if masked is None or shape != [self.core.length] or masked.shape != (self.core.length,):
            raise SecAggError(f"{MASKED_TENSOR} must be uint64 of shape ({self.core.length},), got "
                              f"{dtype} {shape}")
        self.core.receive_masked_input(cid, masked)
        self.reported_examples += int(train_size)

    def unmask_problem(self) -> str | None:
        """Why the survivors cannot unmask the sum, or None -- checked before anyone is asked for a share.

        A survivor's self-mask seed and a dropped client's mask key are each
        rebuilt from ``threshold`` shares held by its neighbours *among the
        survivors* (nobody holds a share of its own secrets).  With three clients
        and threshold 2, one dropout after sharing keys therefore always ends here.
        """
        core = self.core
        alive = set(core.survivors)
        if len(alive) < core.threshold:
            return f"{len(alive)} masked input(s) arrived; the threshold is {core.threshold}"
        for u in sorted(core.senders):
            holders = len(alive.intersection(core.neighbours[u]))
            if holders < core.threshold:
                what = "self-mask" if u in alive else "mask key (it dropped before its masked input)"
                return (f"only {holders} surviving neighbour(s) of {u!r} hold a share of its {what}; "
                        f"{core.threshold} are needed (secagg.threshold)")
        return None

    def unmask_request(self) -> dict:
        return {"round_number": self.round_number, "session": self.session, "survivors": list(self.core.survivors)}

    def take_unmask(self, cid: str, msg: Mapping[str, Any]) -> None:
        if cid not in self.core.survivors:
            raise SecAggError(f"{cid!r} is not a survivor of this round; its shares are not asked for")
        shares = {}
        for u, share in msg["shares"].items():
            if cid not in self.core.neighbours.get(u, ()) or u not in self.core.senders:
                raise SecAggError(f"{cid!r} holds no share of {u!r}")
            shares[u] = (share["kind"], (int(share["x"]), bytes(share["y"])))
        self.core.receive_unmask(cid, shares)

    def mean(self, global_weights: Mapping[str, torch.Tensor]) -> tuple[dict, int]:
        """The FedAvg mean of the survivors' updates and their example count (worker thread: PRGs of the model)."""
        total = self.core.unmasked_sum()
        count = float(total[-1])
        if not np.isfinite(count) or abs(count - self.reported_examples) > 0.5:
            # a client put another n inside its input than it reported, or a share or input was forged:
            # the sum is not the survivors' honest one, so it must not become the global model
            raise SecAggError(f"the unmasked example count is {count:.6g}, but the survivors reported "
                              f"{self.reported_examples} training images in client_update.train_size")
        return fedavg_from_sum(total, global_weights), int(round(count))


# ----------------------------------------------------------------------------- a client's side


class ClientSessions:
    """A client's SecAgg+ state: the session of the round it is in (older ones are dropped)."""

    def __init__(self, client_id: str):
        self.client_id = client_id
        self.sessions: dict[str, SecAggClient] = {}

    def _session(self, msg: Mapping[str, Any]) -> SecAggClient:
        session = self.sessions.get(str(msg.get("session")))
        if session is None:
            raise SecAggError("this client holds no keys for that secure-aggregation session (it restarted, or "
                              "the session is over)")
        return session

    @staticmethod
    def _answer(msg: Mapping[str, Any], **fields: Any) -> dict:
        return {"round_number": int(msg.get("round_number", 0)), "session": str(msg.get("session", "")),
                **fields}

    def refusal(self, msg: Mapping[str, Any], exc: Exception) -> dict:
        """The answer saying why this client cannot go on with the session."""
        return self._answer(msg, ok=False, reason=f"{type(exc).__name__}: {exc}")

    def on_setup(self, msg: Mapping[str, Any]) -> dict:
        """``secagg_setup`` -> ``secagg_keys``."""
        neighbours = [str(v) for v in msg["neighbours"]]
        setup = {"session": str(msg["session"]), "threshold": int(msg["threshold"]), "length": int(msg["length"]),
                 "frac_bits": int(msg.get("frac_bits", DEFAULT_FRAC_BITS)),
                 "neighbours": {self.client_id: neighbours}, "participants": range(int(msg["num_clients"]))}
        if setup["length"] <= 0 or setup["threshold"] < 2 or setup["threshold"] > len(neighbours):
            raise SecAggError(f"a session of length {setup['length']} with threshold {setup['threshold']} among "
                              f"{len(neighbours)} neighbour(s) cannot be secure")
        self.sessions = {setup["session"]: SecAggClient(self.client_id, setup)}  # one round at a time
        keys = self.sessions[setup["session"]].advertise_keys()
        return self._answer(msg, ok=True, c_pk=keys["c_pk"], s_pk=keys["s_pk"])

    def on_peer_keys(self, msg: Mapping[str, Any]) -> dict:
        """``secagg_peer_keys`` -> ``secagg_shares``."""
        keys = {str(v): (bytes(k["c_pk"]), bytes(k["s_pk"])) for v, k in dict(msg["keys"]).items()}
        return self._answer(msg, ok=True, envelopes=self._session(msg).share_keys(keys))

    def masked_upload(self, secagg: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                      global_weights: Mapping[str, torch.Tensor], num_examples: int) -> bytes:
        """The bytes uploaded instead of the weights: ``n * (w - w_global)`` and ``n``, masked, as safetensors."""
        session = self._session(secagg)
        envelopes = {str(u): bytes(e) for u, e in dict(secagg.get("envelopes") or {}).items()}
        values = fedavg_input(weights, global_weights, num_examples)
        try:
            masked = session.masked_input(envelopes, values)
        except ValueError as exc:  # the range check (an update too large for the ring)
            raise SecAggError(str(exc)) from None
        except InvalidTag:
            raise SecAggError("an envelope addressed to this client does not open (tampered with on the way)") from None
        return st_save({MASKED_TENSOR: np.ascontiguousarray(masked, dtype=np.uint64)},
                       metadata={SESSION_KEY: session.session})

    def on_unmask(self, msg: Mapping[str, Any]) -> dict:
        """``secagg_unmask`` -> ``secagg_unmask_shares``."""
        shares = self._session(msg).unmask([str(v) for v in msg["survivors"]])
        return self._answer(msg, ok=True, shares={u: {"kind": kind, "x": int(x), "y": bytes(y)}
                                                  for u, (kind, (x, y)) in shares.items()})
