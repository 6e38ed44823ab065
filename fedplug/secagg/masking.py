"""Fixed-point quantisation into the ring Z_{2^64}, and the pseudo-random masks that hide a vector there.

Quantisation: a float ``x`` becomes ``round(x * 2^f)`` as a signed 64-bit
integer, stored as its two's-complement ``uint64``; numpy's ``uint64``
arithmetic wraps, i.e. it *is* arithmetic mod 2^64.  Sums of quantised values
are exact as long as the true sum stays within ``+-2^63 / 2^f``
(:func:`check_range` refuses inputs that could leave it); each value's rounding
error is at most ``2^-(f+1)``.

Masks: ``prg(seed, n)`` is the ChaCha20 keystream under the 32-byte ``seed``
(nonce all zero) read as ``n`` little-endian ``uint64``: uniform over the ring,
so ``x + mask`` is uniform whatever ``x`` is, and any implementation in any
language derives the same mask from the same seed.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

DEFAULT_FRAC_BITS = 24
_ZERO_NONCE = b"\x00" * 16


def prg(seed: bytes, n: int) -> np.ndarray:
    """``n`` pseudo-random ``uint64`` from a 32-byte seed (ChaCha20 keystream, little-endian)."""
    if len(seed) != 32:
        raise ValueError("a mask seed is 32 bytes")
    stream = Cipher(algorithms.ChaCha20(seed, _ZERO_NONCE), mode=None).encryptor().update(bytes(8 * n))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def check_range(values: np.ndarray, frac_bits: int, num_clients: int) -> None:
    """Refuse values whose quantised sum over ``num_clients`` could wrap around the ring."""
    limit = 2.0 ** (63 - frac_bits) / max(1, num_clients)
    biggest = float(np.max(np.abs(values))) if values.size else 0.0
    if not np.isfinite(biggest) or biggest >= limit:
        raise ValueError(f"a secure-aggregation input of magnitude {biggest:.3g} could overflow the 64-bit ring with "
                         f"{num_clients} clients at {frac_bits} fractional bits (limit {limit:.3g}); clip the "
                         "update or lower the fractional bits")


def quantize(values: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """float64 values -> ``uint64`` ring elements (two's complement of ``round(x * 2^f)``)."""
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(1 << frac_bits))
    return scaled.astype(np.int64).view(np.uint64)


def dequantize(ring: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """``uint64`` ring elements (e.g. a sum) -> float64, reading them as signed."""
    return np.asarray(ring, dtype=np.uint64).view(np.int64).astype(np.float64) / float(1 << frac_bits)
