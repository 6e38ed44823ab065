"""Adaptive clipping: the clip norm follows a target quantile of the clients' update norms.

Andrew, Thakkar, McMahan and Ramaswamy 2021, "Differentially Private Learning
with Adaptive Clipping" (NeurIPS), Algorithm 1 with the geometric update.  In
round t with clip norm ``C_t`` and ``m`` expected clients, each client's bit
``b_k = 1{||Delta_k|| <= C_t}`` is summed and noised::

    b~      = (sum_k b_k + N(0, sigma_b^2)) / m
    C_{t+1} = C_t * exp(-eta_C * (b~ - gamma))

so ``C`` shrinks while more than a fraction ``gamma`` of updates fit under it
and grows otherwise.  The count is a second release about the same clients:
to spend the same privacy as a fixed-clip round with noise multiplier ``z``,
the update itself gets the smaller multiplier (their Theorem 1)::

    z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)        (requires 2 sigma_b > z)

Called by the ``dp_fedavg_adaptive`` aggregator, once per round.
"""

from __future__ import annotations

import math


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update's multiplier ``z_Delta`` so that update + count together spend ``noise_multiplier``."""
    if noise_multiplier == 0:
        return 0.0
    if 2 * count_stddev <= noise_multiplier:
        raise ValueError(
            f"adaptive clipping needs aggregator.clipped_count_stddev > noise_multiplier / 2 "
            f"(got {count_stddev:g} with noise_multiplier {noise_multiplier:g}): the noised count alone would "
            "spend the whole budget; raise clipped_count_stddev (the paper uses expected_clients / 20)")
    return (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5


def next_clip_norm(clip_norm: float, noised_fraction_unclipped: float, target_quantile: float,
                   learning_rate: float) -> float:
    """The geometric update ``C * exp(-eta * (b~ - gamma))``."""
    return clip_norm * math.exp(-learning_rate * (noised_fraction_unclipped - target_quantile))
