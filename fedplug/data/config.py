"""Reading the ``data`` config group and client specs: plain dicts and clear messages for missing values.

Shared by :mod:`fedplug.data` (``prepare_federation``, ``class_names_of``) and
:mod:`fedplug.data.opening` (``open_client_data``, ``open_eval_data``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from fedplug.data.errors import DatasetError

MISSING = "???"  # OmegaConf's mark for a mandatory value


def plain(cfg: Mapping | None, what: str) -> dict:
    """A plain dict from a Hydra/OmegaConf node or a mapping; a missing mandatory value is a clear error."""
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf
        from omegaconf.errors import MissingMandatoryValue

        if isinstance(cfg, DictConfig):
            try:
                return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
            except MissingMandatoryValue as exc:
                key = getattr(exc, "full_key", None) or str(exc)
                raise DatasetError(f"{what}: the mandatory value {key} is not set ({hint(what)})") from None
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise DatasetError(f"{what} must be a mapping, got {type(cfg).__name__}")
    return dict(cfg)


def hint(what: str) -> str:
    return "e.g. data=street5 data.root=/path/to/Street" if what == "data" else "e.g. {format: voc, path: /data/site1}"


def required(cfg: Mapping, key: str, what: str) -> Any:
    value = cfg.get(key)
    if value is None or value == MISSING or value == "":
        raise DatasetError(f"{what}.{key} is not set ({hint(what)})")
    return value


def format_of(cfg: Mapping, what: str, allowed: Sequence[str]) -> str:
    fmt = required(cfg, "format", what)
    if fmt not in allowed:
        raise DatasetError(f"{what}.format is {fmt!r}; choose one of {list(allowed)}")
    return fmt


def resolve_path(root: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p
