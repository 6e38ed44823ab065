"""The Street release as distributed, federated with one command, scored once per round on its shared test set.

``python -m fedplug data=street5 data.root=<release>`` is the whole command: the
format is detected, clients are the release's devices (``device_1`` ..
``device_5``), and the server scores the shared ``test_label.json`` set itself
(``eval.on=auto`` -> ``server``) instead of five clients scoring the same images.
The recorded mAP must equal a central evaluation of the saved checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from fedplug.outputs import read_events

pytestmark = pytest.mark.slow

CLASSES = ["basket", "carton", "chair", "electrombile", "gastank", "sunshade", "table"]


def _release(root: Path, per_device: int = 3, num_test: int = 6) -> Path:
    """A tiny Street release in the distributed form: device ids on train entries only."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    train, test = [], []
    for i in range(5 * per_device + num_test):
        image = rng.integers(0, 60, (72, 88, 3), dtype=np.uint8)
        k = i % 3  # three of the seven classes occur, as bright boxes
        x0, y0 = 8 + 6 * (i % 5), 10 + 4 * (i % 4)
        image[y0:y0 + 30, x0:x0 + 34] = (220 if k == 0 else 60, 220 if k == 1 else 60, 220 if k == 2 else 60)
        Image.fromarray(image).save(root / "images" / f"{i:05d}.jpg", quality=95)
        items = [{"class": CLASSES[k], "bbox": [x0, y0, x0 + 34, y0 + 30]}]
        if i < 5 * per_device:
            train.append({"image_id": f"{i:05d}", "device1_id": 1 + i % 5, "device2_id": 1 + i % 20, "items": items})
        else:
            test.append({"image_id": f"{i:05d}", "items": items})
    (root / "train_label.json").write_text(json.dumps(train))
    (root / "test_label.json").write_text(json.dumps(test))
    return root


def test_street5_as_distributed_is_one_command(tmp_path):
    release = _release(tmp_path / "Street")
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_HOME=str(tmp_path / "hub"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedplug", "data=street5", f"data.root={release}",
         # small enough for a test on two cores; nothing about the data is spelled out
         "run.rounds=2", "train.local_epochs=1", "resource_policy=always", "model.min_size=64", "model.max_size=96",
         f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "the server scores the shared test set" in out

    events = read_events(run_dir / "events.jsonl")
    ready = sorted(e["client_id"] for e in events if e["event"] == "client_ready")
    assert ready == [f"device_{d}" for d in range(1, 6)]
    # every client holds only its own device's training images, and no test image
    assert all(e["num_train"] == 3 and e["num_test"] == 0 for e in events if e["event"] == "client_ready")
    # scored once per round by the server; no client was asked to score the shared images
    assert [e["round"] for e in events if e["event"] == "server_eval"] == [1, 2]
    assert not [e for e in events if e["event"] == "stop_and_eval"]

    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [r["evaluated_by"] for r in rows] == ["server", "server"]
    assert [float(r["eval_images"]) for r in rows] == [6.0, 6.0]
    recorded = float(rows[-1]["map50"])

    # a central evaluation of the saved checkpoint gives the recorded figure
    from fedplug.data import open_eval_data
    from fedplug.evaluation import eval_settings_from
    from fedplug.plugins import activate
    from fedplug.wire import read_checkpoint

    torch.set_num_threads(1)
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    weights, meta = read_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    class_names = tuple(json.loads(meta["class_names"]))
    hook = activate({"detector": config["model"]["name"]}, observers=False).hook
    model = hook.fedplug_build_model(config=config["model"], class_names=class_names)
    model.load_state_dict(weights)
    test = open_eval_data({"format": "street_json", "path": str(release), "test_split": "test"}, class_names)
    assert len(test) == 6
    result = hook.fedplug_evaluate(model=model, dataset=test, settings=eval_settings_from(config["eval"], "cpu"))
    assert result.map50 == pytest.approx(recorded, abs=1e-9)
    assert result.recall == pytest.approx(float(rows[-1]["recall"]), abs=1e-9)
    assert result.loss == pytest.approx(float(rows[-1]["test_loss"]), rel=1e-6)
    assert sum(len(s) for s in result.stats.scores) > 0  # the figures compared come from real detections
