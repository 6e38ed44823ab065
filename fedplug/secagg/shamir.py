"""t-of-n Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret ``s < 2^256`` is the constant term of a random polynomial of degree
``t - 1``; share ``i`` (``x = 1 .. n``) is the polynomial at ``x``.  Any ``t``
shares give ``s`` back by Lagrange interpolation at 0; fewer reveal nothing
about it.  The field is the Mersenne prime ``2^521 - 1`` (larger than any
secret), and the coefficients come from ``secrets`` (the OS's CSPRNG).
SecAgg uses it for each client's mask-key and self-mask seed (``protocol.py``).
"""

from __future__ import annotations

import secrets as _secrets
from typing import Sequence

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # 521 bits


def split(secret: bytes, n: int, t: int) -> list[tuple[int, bytes]]:
    """``n`` shares ``(x, y)`` of ``secret`` (at most 32 bytes), any ``t`` of which reconstruct it."""
    if not 1 <= t <= n:
        raise ValueError(f"Shamir sharing needs 1 <= threshold <= shares, got threshold {t} of {n}")
    if len(secret) > 32:
        raise ValueError("a Shamir secret here is at most 32 bytes")
    coefficients = [int.from_bytes(secret, "big")] + [_secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y.to_bytes(SHARE_BYTES, "big")))
    return shares


def combine(shares: Sequence[tuple[int, bytes]], t: int, length: int = 32) -> bytes:
    """The secret from at least ``t`` shares with distinct ``x`` (extra shares are ignored)."""
    unique = {int(x): int.from_bytes(y, "big") for x, y in shares}
    if len(unique) < t:
        raise ValueError(f"{len(unique)} distinct share(s) cannot reconstruct a secret of threshold {t}")
    points = sorted(unique.items())[:t]
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num = den = 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not reconstruct a valid secret (corrupted or mixed shares)")
    return secret.to_bytes(length, "big")
