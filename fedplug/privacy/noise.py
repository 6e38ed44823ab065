"""Gaussian noise for differential privacy, from a seeded ``torch.Generator``.

Production: every call draws a fresh 64-bit seed from ``os.urandom`` (the
kernel's CSPRNG), so nobody -- the server operator included -- can predict or
replay the noise.  Test seam: a fixed ``seed`` (the plugins' ``noise_seed``
config key, ``null`` by default) makes the noise of round ``r`` reproducible,
derived from ``(seed, round, stream)``.  A known seed makes the noise known, so
it removes the privacy entirely: use it only in tests and benchmarks.

torch's CPU generator is a Mersenne Twister, not a cryptographic generator;
with an unpredictable seed per round this is the same practice as Opacus'
default (non-``secure_mode``) noise.  ``docs/privacy.md`` lists that limit.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Mapping

import torch


def noise_generator(seed: int | None, round_number: int, stream: str = "update") -> torch.Generator:
    """A CPU generator for one round's noise: from ``os.urandom`` when ``seed`` is None (production)."""
    if seed is None:
        value = int.from_bytes(os.urandom(8), "little")
    else:  # test seam: reproducible per (seed, round, stream), independent across rounds and streams
        digest = hashlib.sha256(f"{int(seed)}/{int(round_number)}/{stream}".encode()).digest()
        value = int.from_bytes(digest[:8], "little")
    return torch.Generator(device="cpu").manual_seed(value & ((1 << 63) - 1))


def add_gaussian_noise_(tensors: Mapping[str, torch.Tensor], std: float, generator: torch.Generator,
                        names: Iterable[str] | None = None) -> None:
    """Add independent N(0, std^2) noise to every coordinate of ``tensors`` (float64, in place), in key order."""
    if std < 0:
        raise ValueError(f"the noise standard deviation must be >= 0, got {std}")
    if std == 0:
        return
    for name in (names if names is not None else list(tensors)):
        t = tensors[name]
        t.add_(torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device), alpha=std)


def gaussian(std: float, generator: torch.Generator) -> float:
    """One N(0, std^2) draw (the noised clipped count of adaptive clipping)."""
    return float(torch.randn((), generator=generator, dtype=torch.float64)) * std
