"""Start-up checks of the composed config: a wrong value stops the run before anything starts.

Every message names the offending key and says what would be accepted, so
``python -m fedplug run.rounds=-1`` fails in a second with
``run.rounds must be an integer >= 1, got -1``.
"""

from __future__ import annotations

from typing import Any

MODES = ("embedded", "server", "client", "plugins")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            raise ConfigError(f"{dotted} is missing from the config") from None
    return node


def _int(cfg: Any, key: str, minimum: int) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(cfg: Any, key: str, low: float, high: float | None = None, *, open_low: bool = False) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    too_low = value <= low if open_low else value < low
    if too_low or (high is not None and value > high):
        bound = f"{'>' if open_low else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ConfigError(f"{key} must be {bound}, got {value!r}")
    return float(value)


def _choice(cfg: Any, key: str, choices: tuple[str, ...]) -> str:
    value = _get(cfg, key)
    if str(value) not in choices and not (key.endswith(".device") and str(value).startswith("cuda:")):
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def validate(cfg: Any) -> None:
    """Raise :class:`ConfigError` for the first value that cannot work."""
    mode = _choice(cfg, "mode", MODES)
    if mode == "plugins":
        return
    rounds = _int(cfg, "run.rounds", 1)
    num_clients = _int(cfg, "run.num_clients", 1)
    min_clients = _int(cfg, "run.min_clients", 1)
    per_round = _int(cfg, "run.clients_per_round", 1)
    if per_round > min_clients:
        raise ConfigError(
            f"run.clients_per_round ({per_round}) must not exceed run.min_clients ({min_clients}): "
            "a round could contact clients that are not there")
    if mode == "embedded" and min_clients > num_clients:
        raise ConfigError(
            f"run.min_clients ({min_clients}) exceeds run.num_clients ({num_clients}) in mode=embedded: "
            "the run would wait forever; raise run.num_clients or lower run.min_clients")
    eval_every = _int(cfg, "run.eval_every", 1)
    if eval_every > rounds:
        pass  # fine: the last round is always evaluated
    _int(cfg, "run.patience", 0)
    _choice(cfg, "run.on_write_error", ("stop", "continue"))
    _int(cfg, "server.port", 0)
    if _get(cfg, "server.port") > 65535:
        raise ConfigError(f"server.port must be <= 65535, got {_get(cfg, 'server.port')}")
    _number(cfg, "server.quorum", 0.0, 1.0, open_low=True)
    for key in ("update_timeout_s", "eval_timeout_s", "resource_timeout_s", "ready_timeout_s",
                "ping_interval_s", "ping_timeout_s", "max_message_mb"):
        _number(cfg, f"server.{key}", 0.0, open_low=True)
    _number(cfg, "server.reconnect_grace_s", 0.0)
    _int(cfg, "server.resource_max_attempts", 1)
    _int(cfg, "server.round_retries", 0)
    _choice(cfg, "server.on_resource_exhausted", ("proceed", "fail"))
    _choice(cfg, "client.device", DEVICES)
    _number(cfg, "client.reconnect_timeout_s", 0.0, open_low=True)
    _number(cfg, "client.reconnect_delay_max_s", 0.0, open_low=True)
    _int(cfg, "client.reconnect_attempts", 0)
    _number(cfg, "client.call_timeout_s", 0.0, open_low=True)
    _choice(cfg, "client.protocol_version", ("1", "2", "3"))
    chunk_kb = _int(cfg, "server.chunk_kb", 4)
    if chunk_kb > 65536:
        raise ConfigError(f"server.chunk_kb must be <= 65536 (64 MiB), got {chunk_kb}")
    _int(cfg, "client.torch_threads", 0)
    _int(cfg, "train.local_epochs", 1)
    _int(cfg, "train.batch_size", 1)
    _number(cfg, "train.lr", 0.0, open_low=True)
    _choice(cfg, "train.optimizer", ("sgd", "adam", "adamw"))
    _number(cfg, "train.momentum", 0.0, 1.0)
    _number(cfg, "train.weight_decay", 0.0)
    _int(cfg, "train.warmup_iters", 0)
    _int(cfg, "train.grad_accum_steps", 1)
    _choice(cfg, "train.lr_schedule", ("constant", "cosine", "step"))
    _number(cfg, "train.max_grad_norm", 0.0)
    _int(cfg, "eval.batch_size", 1)
    _number(cfg, "eval.score_threshold", 0.0, 1.0)
    _choice(cfg, "eval.on", ("auto", "server", "clients", "both"))
    _choice(cfg, "eval.device", DEVICES)
    evaluators = str(_get(cfg, "eval.clients"))
    if evaluators not in ("all", "round") and not (evaluators.isdigit() and int(evaluators) >= 1):
        raise ConfigError(f"eval.clients must be all, round or a number of clients >= 1, got {evaluators!r}")
    _check_views(cfg)
    _check_security(cfg, mode)
    _check_secagg(cfg)
    if mode == "embedded":
        from fedplug.launchers import check_launcher_config

        check_launcher_config(cfg)  # launcher=local | ray and its keys (conf/launcher/)
    for group in ("aggregator", "model", "resource_policy"):
        if not isinstance(_get(cfg, f"{group}.name"), str):
            raise ConfigError(f"{group}.name must be a plugin name (see `fedplug plugins`)")
    if mode == "client" and not _get(cfg, "client.data.path"):
        raise ConfigError("client.data.path is not set: point it at this client's dataset, "
                          "e.g. client.data.path=/data/site1 (a Pascal-VOC folder)")


def _check_secagg(cfg: Any) -> None:
    """secagg.* (fedplug/secagg/run.py): secure aggregation needs a mean-based aggregator and no codec."""
    from omegaconf import OmegaConf

    from fedplug.secagg.run import check_config

    secagg = cfg.get("secagg")
    if secagg is None:
        return
    codec = cfg.get("codec")
    codec_name = str(codec.get("name", "none")) if codec is not None else "none"
    problem = check_config(OmegaConf.to_container(secagg) if OmegaConf.is_config(secagg) else dict(secagg),
                           str(_get(cfg, "aggregator.name")), codec_name, int(_get(cfg, "run.clients_per_round")))
    if problem:
        raise ConfigError(problem)


def _check_security(cfg: Any, mode: str) -> None:
    """Who may connect, TLS and the limits on peers (docs/security.md); TLS files are read at start-up."""
    server, client = _get(cfg, "server"), _get(cfg, "client")
    if server.get("credentials_file") and server.get("token"):
        raise ConfigError("set server.credentials_file (per-site secrets) or server.token (one shared secret), "
                          "not both")
    if mode == "embedded" and server.get("credentials_file"):
        raise ConfigError("server.credentials_file holds the secrets of sites on other hosts; mode=embedded starts "
                          "its own clients, which do not know them: use server.token, or mode=server")
    if client.get("secret") and client.get("secret_file"):
        raise ConfigError("set client.secret or client.secret_file, not both")
    for key in ("server.token", "server.status_token", "client.token", "client.secret"):
        # the wire refuses what this would let through (fedplug/schemas.py Secret): say so at start-up
        value = _get(cfg, key)
        if value and not (len(str(value)) <= 256 and str(value).isprintable()):
            raise ConfigError(f"{key} must be a string of at most 256 printable characters "
                              "(no newlines or control characters), e.g. one from `openssl rand -hex 32`")
    _choice(cfg, "server.ssl_client_certs", ("none", "optional", "required"))
    _number(cfg, "server.handshake_timeout_s", 0.0, open_low=True)
    _int(cfg, "server.max_connections_per_address", 1)
    _int(cfg, "server.max_connections", 1)
    _int(cfg, "server.max_clients", 1)
    _int(cfg, "server.auth_max_failures", 1)
    _number(cfg, "server.auth_lockout_s", 0.0)
    examples = _int(cfg, "server.max_client_examples", 1)
    if examples > 10**9:
        raise ConfigError(f"server.max_client_examples must be <= 1000000000 (the protocol's bound), got {examples}")
    if mode == "embedded" and _get(cfg, "server.max_connections_per_address") < _get(cfg, "run.num_clients") \
            and str((cfg.get("launcher") or {}).get("name", "local")) == "local":  # launcher=ray caps it itself
        raise ConfigError(f"server.max_connections_per_address ({_get(cfg, 'server.max_connections_per_address')}) "
                          f"is below run.num_clients ({_get(cfg, 'run.num_clients')}): mode=embedded connects them "
                          "all from 127.0.0.1")


def _bool(cfg: Any, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def _check_views(cfg: Any) -> None:
    """The ``dashboard`` and ``ui`` sections: how a run can be watched (docs/dashboard.md)."""
    _bool(cfg, "dashboard.enabled")
    _int(cfg, "dashboard.max_viewers", 1)
    _int(cfg, "dashboard.max_queue", 16)
    _int(cfg, "dashboard.recent_events", 1)
    live = _get(cfg, "ui.live")
    if not isinstance(live, bool) and live != "auto":
        raise ConfigError(f"ui.live must be auto, true or false, got {live!r}")
    _bool(cfg, "ui.quiet")
