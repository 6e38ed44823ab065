"""Client-side pieces that need no server: settings, devices, launcher command lines."""

import pytest
import torch

from fedplug.client import resolve_device, train_settings_from
from fedplug.launcher import client_command, hydra_literal


def test_train_settings_keep_known_fields_and_carry_the_rest_as_extra():
    s = train_settings_from({"lr": 0.1, "local_epochs": 3, "proximal_mu": 0.01, "seed": 5, "custom": 7,
                             "device": "cuda"}, round_number=4, device="cpu")
    assert s.lr == 0.1 and s.local_epochs == 3 and s.proximal_mu == 0.01 and s.round_number == 4
    assert s.device == "cpu"  # the device is the client's own choice, never the server's
    assert s.extra == {"custom": 7}


def test_device_resolution():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="not one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_hydra_literals_survive_hydra_parsing():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = {"path": "/tmp/it's a dir", "n": 3, "flag": True, "none": None, "jitter": [0.9, 1.1],
             "nested": {"k": "v"}}
    parsed = OverridesParser.create().parse_override(f"x={hydra_literal(value)}").value()
    assert parsed == value


def test_client_command_is_a_real_mode_client_invocation(tmp_path):
    cmd = client_command("http://127.0.0.1:5", "c1", {"format": "voc", "path": "/d"}, tmp_path, 1, None, "cpu",
                         "secret", passthrough=["hydra.searchpath=[pkg://x]"])
    assert cmd[1:4] == ["-m", "fedplug", "mode=client"]
    assert "++client.data.path='/d'" in cmd and "client.token='secret'" in cmd and cmd[-1].startswith("hydra.searchpath")
