"""Composing every option of every config group, and the start-up checks on values."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from fedplug.config import ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))


def _compose(*overrides):
    with initialize_config_module(config_module="fedplug.conf", version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_the_design_groups_exist():
    assert {"aggregator", "model", "resource_policy", "data"} <= set(GROUPS)


@pytest.mark.parametrize(
    "group, option",
    [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))],
)
def test_every_option_of_every_group_composes(group, option):
    cfg = _compose(f"{group}={option}")
    node = cfg.model if group == "model" else cfg[group]
    if group in ("aggregator", "model", "resource_policy"):
        assert node.name == option  # the option's file name is the plugin's entry-point name
    if group == "data" and "???" in str(node.get("root", "")):
        return
    validate(cfg)


def test_default_config_is_valid_and_names_the_embedded_federation():
    cfg = _compose()
    validate(cfg)
    assert cfg.mode == "embedded" and cfg.model.name == "frcnn" and cfg.aggregator.name == "fedavg"


@pytest.mark.parametrize(
    "override, key",
    [
        ("run.rounds=-1", "run.rounds"),
        ("run.rounds=0", "run.rounds"),
        ("run.clients_per_round=5", "run.clients_per_round"),
        ("run.min_clients=4", "run.min_clients"),
        ("client.device=tpu", "client.device"),
        ("server.quorum=0", "server.quorum"),
        ("server.quorum=1.5", "server.quorum"),
        ("run.eval_every=0", "run.eval_every"),
        ("run.patience=-2", "run.patience"),
        ("train.lr=0", "train.lr"),
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("mode=banana", "mode"),
        ("server.update_timeout_s=-5", "server.update_timeout_s"),
        ("server.port=70000", "server.port"),
        ("eval.on=everywhere", "eval.on"),
        ("eval.device=tpu", "eval.device"),
        ("eval.clients=some", "eval.clients"),
        ("eval.clients=0", "eval.clients"),
        ("server.token='a\tb'", "server.token"),  # the wire refuses a control character in a secret
        ("client.secret=" + "x" * 257, "client.secret"),
    ],
)
def test_wrong_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(_compose(override))


def test_client_mode_requires_a_data_path():
    with pytest.raises(ConfigError, match="client.data.path"):
        validate(_compose("mode=client"))
