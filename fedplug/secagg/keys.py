"""Key agreement and the envelope for shares: X25519, HKDF-SHA256, ChaCha20-Poly1305 (``cryptography``).

Each client makes two X25519 key pairs per aggregation (Bonawitz et al. 2017,
Sec. 4): ``c`` to agree on the keys that encrypt the Shamir shares it sends to
its neighbours through the server, ``s`` to agree on the pairwise mask seeds.
An agreed secret goes through HKDF-SHA256 with a purpose label and the
aggregation's id as ``info``, so a key for one purpose or session is never
reused for another.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

NONCE = b"\x00" * 12  # each envelope key encrypts exactly one message (one per sender, receiver and session)


class KeyPair:
    """An X25519 key pair; ``public`` is the 32 raw bytes that travel."""

    def __init__(self, private: X25519PrivateKey | None = None):
        self.private = private or X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                          serialization.NoEncryption())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> "KeyPair":
        return cls(X25519PrivateKey.from_private_bytes(raw))


def agree(private: X25519PrivateKey, peer_public: bytes, purpose: str, session: str) -> bytes:
    """32 bytes both sides derive: HKDF-SHA256(X25519(private, peer_public), info=purpose|session)."""
    if not isinstance(peer_public, (bytes, bytearray)) or len(peer_public) != 32:
        raise ValueError("a peer's X25519 public key must be 32 raw bytes")
    shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=f"fedplug-secagg/{purpose}/{session}".encode()).derive(shared)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` under ``key`` (ChaCha20-Poly1305); ``associated`` is bound to it."""
    return ChaCha20Poly1305(key).encrypt(NONCE, plaintext, associated)


def open_sealed(key: bytes, ciphertext: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`; raises ``cryptography.exceptions.InvalidTag`` when tampered with."""
    return ChaCha20Poly1305(key).decrypt(NONCE, bytes(ciphertext), associated)
