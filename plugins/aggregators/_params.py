"""Reading an aggregator's parameters from its config group, with errors that say what to set.

Every aggregator calls :func:`check_keys` and :func:`number` at the top of its
``fedplug_aggregate`` (and ``fedplug_aggregator_round_settings``) hook, so a
wrong value in ``conf/aggregator/<name>.yaml`` or on the command line fails on
the first round with a message naming ``aggregator.<key>``.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping


def _where(key: str) -> str:
    return f"aggregator.{key}"


def check_keys(config: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Refuse keys this aggregator does not know (usually a typo on the command line)."""
    allowed = set(allowed) | {"name"}
    unknown = sorted(k for k in config if k not in allowed and not str(k).startswith("_"))
    if unknown:
        name = config.get("name", "?")
        raise ValueError(
            f"aggregator {name!r} has no parameter {', '.join(_where(k) for k in unknown)}; "
            f"its parameters are: {', '.join(sorted(allowed - {'name'})) or 'none'}"
        )


def number(
    config: Mapping[str, Any],
    key: str,
    default: float,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """``config[key]`` (or ``default``) as a float, or an int when ``integer``, checked against its range."""
    value = config.get(key, default)
    if value is None:
        value = default
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    wanted = f"{'an integer' if integer else 'a number'} in {lo}{'-inf' if low is None else low}, " \
             f"{'inf' if high is None else high}{hi}"
    bad = ValueError(f"{_where(key)} must be {wanted}, got {value!r}; set it with {_where(key)}=<value>")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if integer and float(value) != int(value):
        raise bad
    value = int(value) if integer else float(value)
    if not math.isfinite(value):
        raise bad
    if low is not None and (value < low or (low_open and value == low)):
        raise bad
    if high is not None and (value > high or (high_open and value == high)):
        raise bad
    return value


def optional_count(config: Mapping[str, Any], key: str) -> int | None:
    """A positive integer, or ``None`` when the key is absent or null."""
    if config.get(key) is None:
        return None
    return int(number(config, key, 1, low=1, integer=True))
