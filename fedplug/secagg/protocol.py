"""SecAgg+ for one aggregation: the client's and the server's side of its four message rounds.

Bell, Bonawitz, Gascon, Lepoint and Raykova 2020, "Secure Single-Server
Aggregation with (Poly)Logarithmic Overhead" (CCS), on Bonawitz et al. 2017's
protocol, for an honest-but-curious server.  Messages are plain dicts of bytes,
ints and numpy arrays (what Socket.IO events would carry)::

    0 server  -> clients  setup: session id, participants, each one's neighbours, threshold t, vector length
    1 client  -> server   advertise_keys: two X25519 public keys (c: share envelopes, s: pairwise masks)
      server  -> client   the public keys of its neighbours that advertised (U1)
    2 client  -> server   share_keys: per neighbour, an envelope (ChaCha20-Poly1305 under KA(c)) holding a
                          Shamir share of its s private key and of its self-mask seed b
      server  -> client   the envelopes addressed to it (from U2, the clients that shared)
    3 client  -> server   masked_input: y = x + PRG(b) + sum_v sign(u, v) PRG(KA(s_u, s_v)) mod 2^64
                          over its neighbours v in U2 (sign +1 when u < v, else -1)
      server  -> client   the survivors U3 (their masked input arrived)
    4 client  -> server   unmask: for each neighbour in U3 its share of b; for each neighbour in
                          U2 \\ U3 (dropped after sharing) its share of s -- never both for one client
      server              sum_{U3} y - sum_{U3} PRG(b_u) - the dropped clients' dangling pair masks = sum_{U3} x

The pairwise masks cancel between survivors; a client that dropped *after*
its masked input is still in the sum (its self-mask is removed with the
others' shares of b); one that dropped *before* is excluded (its pair masks in
the survivors' inputs are recomputed from its reconstructed s key).  The server
sees only masked vectors, which are uniform in Z_{2^64}^L, and the sum.

Neighbourhoods: SecAgg+ replaces the complete graph by a random k-regular
one (:func:`neighbourhoods`); with k = n - 1 it is the original SecAgg.
Weighting: :func:`fedavg_input` pre-scales a client's delta by its example
count and appends the count, so the sum gives the FedAvg mean
(:func:`fedavg_from_sum`) without revealing any client's count.
"""

from __future__ import annotations

import random
import secrets as _secrets
from typing import Mapping, Sequence

import numpy as np
import torch

from fedplug.secagg import keys as K
from fedplug.secagg import shamir
from fedplug.secagg.masking import DEFAULT_FRAC_BITS, check_range, dequantize, prg, quantize


class SecAggError(RuntimeError):
    """The aggregation cannot complete (too few clients left, a malformed message); the text says which."""


def neighbourhoods(client_ids: Sequence[str], degree: int, seed: int | None = None) -> dict[str, list[str]]:
    """A k-regular graph (k even, or n - 1): each client's ``degree`` neighbours, on a shuffled ring.

    Bell et al. choose a random graph of logarithmic degree; a shuffled Harary
    ring gives every client exactly ``degree`` neighbours.  ``degree >= n - 1``
    is the complete graph (the original SecAgg).
    """
    ids = sorted(client_ids)
    n = len(ids)
    if degree >= n - 1:
        return {c: [o for o in ids if o != c] for c in ids}
    if degree < 2 or degree % 2:
        raise SecAggError(f"the neighbourhood degree must be even and >= 2 (or >= n - 1), got {degree}")
    order = ids[:]
    random.Random(seed).shuffle(order)
    graph = {c: set() for c in ids}
    for i, c in enumerate(order):
        for step in range(1, degree // 2 + 1):
            o = order[(i + step) % n]
            graph[c].add(o)
            graph[o].add(c)
    return {c: sorted(v) for c, v in graph.items()}


def envelope_purpose(sender: str, receiver: str) -> str:
    """The HKDF purpose of the key that seals ``sender``'s envelope for ``receiver``: one key per direction.

    X25519 gives u and v the same secret, and every envelope uses the all-zero
    nonce; a key shared by both directions would encrypt two plaintexts under one
    key and nonce, and the server, which relays both, could XOR them apart.
    """
    return f"shares/{sender}->{receiver}"


def _sign(u: str, v: str) -> int:
    return 1 if u < v else -1


def _pair_mask(seed: bytes, length: int) -> np.ndarray:
    return prg(seed, length)


class SecAggClient:
    """One client's side; call the methods in order with what the server relays."""

    def __init__(self, client_id: str, setup: Mapping):
        self.id = client_id
        self.session = str(setup["session"])
        self.threshold = int(setup["threshold"])
        self.length = int(setup["length"])
        self.frac_bits = int(setup.get("frac_bits", DEFAULT_FRAC_BITS))
        self.neighbours = list(setup["neighbours"][client_id])
        self.num_clients = len(setup["participants"])
        self.c = K.KeyPair()
        self.s = K.KeyPair()
        self.b = _secrets.token_bytes(32)  # the self-mask seed
        self.peer_keys: dict[str, tuple[bytes, bytes]] = {}
        self.shared_with: list[str] = []  # neighbours whose shares reached us (U2 among our neighbours)
        self.received: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (share of its s key, share of its b)
        self.masked_sent = False

    # round 1
    def advertise_keys(self) -> dict:
        return {"client_id": self.id, "c_pk": self.c.public, "s_pk": self.s.public}

    # round 2
    def share_keys(self, peer_keys: Mapping[str, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Envelopes for each neighbour that advertised keys: Shamir shares of our s key and of b."""
        self.peer_keys = {v: tuple(peer_keys[v]) for v in self.neighbours if v in peer_keys}
        if len(self.peer_keys) < self.threshold:
            raise SecAggError(f"only {len(self.peer_keys)} neighbour(s) of {self.id} advertised keys; the threshold "
                              f"is {self.threshold}")
        order = sorted(self.peer_keys)
        s_shares = shamir.split(self.s.private_bytes(), len(order), self.threshold)
        b_shares = shamir.split(self.b, len(order), self.threshold)
        out = {}
        for v, (x, s_share), (_, b_share) in zip(order, s_shares, b_shares):
            key = K.agree(self.c.private, self.peer_keys[v][0], envelope_purpose(self.id, v), self.session)
            body = x.to_bytes(2, "big") + s_share + b_share
            out[v] = K.seal(key, body, f"{self.id}->{v}".encode())
        return out

    # round 3
    def masked_input(self, envelopes: Mapping[str, bytes], values: np.ndarray) -> np.ndarray:
        """Open the shares addressed to us, then mask ``values`` (float64, length ``length``) in the ring."""
        for u, sealed in envelopes.items():
            if u not in self.peer_keys:
                continue  # not a neighbour of ours, or it advertised no keys: ignore
            key = K.agree(self.c.private, self.peer_keys[u][0], envelope_purpose(u, self.id), self.session)
            body = K.open_sealed(key, sealed, f"{u}->{self.id}".encode())
            x = int.from_bytes(body[:2], "big")
            n = shamir.SHARE_BYTES
            self.received[u] = ((x, body[2:2 + n]), (x, body[2 + n:2 + 2 * n]))
        self.shared_with = sorted(self.received)
        values = np.asarray(values, dtype=np.float64)
        if values.shape != (self.length,):
            raise SecAggError(f"the input has shape {values.shape}, the session expects ({self.length},)")
        check_range(values, self.frac_bits, self.num_clients)
        y = quantize(values, self.frac_bits)
        y += prg(self.b, self.length)
        for v in self.shared_with:
            seed = K.agree(self.s.private, self.peer_keys[v][1], "mask", self.session)
            if _sign(self.id, v) > 0:
                y += _pair_mask(seed, self.length)
            else:
                y -= _pair_mask(seed, self.length)
        self.masked_sent = True
        return y

    # round 4
    def unmask(self, survivors: Sequence[str]) -> dict[str, tuple[str, tuple[int, bytes]]]:
        """Our shares: b of each surviving neighbour, s of each neighbour that shared but dropped."""
        alive = set(survivors)
        if len(alive) < self.threshold:
            raise SecAggError(f"only {len(alive)} client(s) survived; fewer than the threshold {self.threshold}: "
                              "refusing to reveal shares")
        out = {}
        for u, (s_share, b_share) in self.received.items():
            out[u] = ("b", b_share) if u in alive else ("s", s_share)
        return out


class SecAggServer:
    """The server's side: routes keys and envelopes, sums masked inputs, and unmasks only the sum."""

    def __init__(self, participants: Sequence[str], length: int, threshold: int, degree: int | None = None,
                 frac_bits: int = DEFAULT_FRAC_BITS, graph_seed: int | None = None):
        self.participants = sorted(participants)
        n = len(self.participants)
        degree = n - 1 if degree is None else degree
        if not 2 <= threshold <= min(degree, n - 1):
            # a client's secrets are shared among its neighbours only: t of them must be able to rebuild them
            raise SecAggError(f"the threshold must be between 2 and the neighbourhood size "
                              f"({min(degree, n - 1)}), got {threshold}")
        self.session = _secrets.token_hex(8)
        self.length, self.threshold, self.frac_bits = int(length), int(threshold), int(frac_bits)
        self.neighbours = neighbourhoods(self.participants, degree, graph_seed)
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.envelopes: dict[str, dict[str, bytes]] = {}  # receiver -> sender -> envelope
        self.senders: set[str] = set()
        self.sum = np.zeros(self.length, dtype=np.uint64)
        self.survivors: list[str] = []
        self.unmask_shares: dict[str, dict[str, tuple[str, tuple[int, bytes]]]] = {}

    def setup(self) -> dict:
        return {"session": self.session, "participants": self.participants, "neighbours": self.neighbours,
                "threshold": self.threshold, "length": self.length, "frac_bits": self.frac_bits}

    def receive_keys(self, message: Mapping) -> None:
        cid = message["client_id"]
        if cid not in self.neighbours:
            raise SecAggError(f"{cid!r} is not a participant of this aggregation")
        self.keys[cid] = (bytes(message["c_pk"]), bytes(message["s_pk"]))

    def keys_for(self, cid: str) -> dict[str, tuple[bytes, bytes]]:
        return {v: self.keys[v] for v in self.neighbours[cid] if v in self.keys}

    def receive_shares(self, sender: str, envelopes: Mapping[str, bytes]) -> None:
        for receiver, sealed in envelopes.items():
            if receiver in self.neighbours.get(sender, ()):
                self.envelopes.setdefault(receiver, {})[sender] = bytes(sealed)
        self.senders.add(sender)

    def envelopes_for(self, cid: str) -> dict[str, bytes]:
        return dict(self.envelopes.get(cid, {}))

    def receive_masked_input(self, cid: str, masked: np.ndarray) -> None:
        if cid not in self.senders or cid in self.survivors:
            raise SecAggError(f"a masked input from {cid!r} is not expected (it shared no keys, or sent twice)")
        masked = np.asarray(masked, dtype=np.uint64)
        if masked.shape != (self.length,):
            raise SecAggError(f"the masked input of {cid!r} has shape {masked.shape}, expected ({self.length},)")
        self.sum += masked  # the only thing kept: individual masked inputs are not stored
        self.survivors.append(cid)

    def receive_unmask(self, cid: str, shares: Mapping[str, tuple[str, tuple[int, bytes]]]) -> None:
        alive = set(self.survivors)
        for u, (kind, _) in shares.items():
            if (kind == "b") != (u in alive):
                raise SecAggError(f"{cid!r} sent a {kind!r} share of {u!r}, which does not match its state")
        self.unmask_shares[cid] = dict(shares)

    def unmasked_sum(self) -> np.ndarray:
        """The float64 sum of the survivors' inputs; raises when too few shares came back."""
        if len(self.survivors) < self.threshold:
            raise SecAggError(f"only {len(self.survivors)} masked input(s) arrived; the threshold is {self.threshold}")
        total = self.sum.copy()
        collected: dict[tuple[str, str], list] = {}
        for shares in self.unmask_shares.values():
            for u, (kind, share) in shares.items():
                collected.setdefault((u, kind), []).append(share)

        def secret(u: str, kind: str) -> bytes:
            got = collected.get((u, kind), [])
            try:
                return shamir.combine(got, self.threshold)
            except ValueError as exc:
                raise SecAggError(f"cannot recover {u!r}'s {'self-mask' if kind == 'b' else 'mask key'}: "
                                  f"{exc} (too many clients dropped before unmasking)") from None

        for u in self.survivors:
            total -= prg(secret(u, "b"), self.length)
        dropped = sorted(self.senders - set(self.survivors))
        for u in dropped:
            s_key = K.KeyPair.from_private_bytes(secret(u, "s"))
            for v in self.neighbours[u]:
                if v in self.survivors and v in self.senders:
                    seed = K.agree(s_key.private, self.keys[v][1], "mask", self.session)
                    if _sign(v, u) > 0:  # v added +PRG(s_vu) to its input: take it out
                        total -= _pair_mask(seed, self.length)
                    else:
                        total += _pair_mask(seed, self.length)
        return dequantize(total, self.frac_bits)


# ----------------------------------------------------------------------------- FedAvg through SecAgg


def float_names(template: Mapping[str, torch.Tensor]) -> list[str]:
    """The floating tensors' names in sorted order: both sides lay the vector out the same, whatever each
    one's dict order (a state dict's, a decoded safetensors file's)."""
    return sorted(n for n, t in template.items() if t.is_floating_point())


def fedavg_input(weights: Mapping[str, torch.Tensor], global_weights: Mapping[str, torch.Tensor],
                 num_examples: int) -> np.ndarray:
    """A client's SecAgg input: ``n_k * (w^k - w_t)`` over floating tensors, then ``n_k`` itself."""
    parts = [(weights[n].detach().double() - global_weights[n].detach().double()).reshape(-1).numpy()
             for n in float_names(global_weights)]
    return np.concatenate([p * float(num_examples) for p in parts] + [np.array([float(num_examples)])])


def input_length(global_weights: Mapping[str, torch.Tensor]) -> int:
    return sum(global_weights[n].numel() for n in float_names(global_weights)) + 1


def fedavg_from_sum(total: np.ndarray, global_weights: Mapping[str, torch.Tensor]) -> dict:
    """The FedAvg global model from the unmasked sum: ``w_t + sum(n_k delta_k) / sum(n_k)``."""
    count = float(total[-1])
    if count <= 0:
        raise SecAggError("the unmasked example count is not positive")
    out = {name: g.detach().clone() for name, g in global_weights.items() if not g.is_floating_point()}
    offset = 0  # integer buffers (BatchNorm's counters) are not aggregated through SecAgg: kept
    for name in float_names(global_weights):
        g = global_weights[name]
        n = g.numel()
        delta = torch.from_numpy(total[offset:offset + n] / count).reshape(g.shape)
        out[name] = (g.detach().double() + delta).to(g.dtype)
        offset += n
    return {name: out[name] for name in global_weights}
