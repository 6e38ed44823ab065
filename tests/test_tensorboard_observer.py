"""The built-in ``tensorboard`` observer: its event files hold the run's scalars, config and update norms."""

import asyncio
import logging

import pytest
import torch

from fedplug_plugins.observers import tensorboard as tb
from scripted import compose_cfg, run_scripted_federation, toy_plugins

pytest.importorskip("tensorboard", reason="pip install 'fedplug[tensorboard]' (it is in the test extra)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _run(tmp_path, observer):
    cfg = compose_cfg("run.rounds=3", "run.min_clients=2", "run.clients_per_round=2", "run.num_clients=2",
                      "client.token=hunter2")
    return asyncio.run(run_scripted_federation(cfg, tmp_path, {"a": "good", "b": "good"},
                                               plugins=toy_plugins(observer=observer),
                                               a={"delta": 1.0, "train_size": 10}, b={"delta": 4.0,
                                                                                      "train_size": 30}))


def _events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_the_event_files_hold_every_round_s_scalars_per_client_figures_and_update_norms(tmp_path):
    observer = tb.TensorBoardObserver()
    status, server, _ = _run(tmp_path, observer)
    assert status == 0
    acc = _events(tmp_path / "tensorboard")
    tags = acc.Tags()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    for key in ("map50", "recall", "train_loss", "test_loss"):
        expected = [(r.round_number, getattr(r, key)) for r in server.history]
        assert scalars[f"global/{key}"] == [(s, pytest.approx(v)) for s, v in expected], key
    assert scalars["round/participants"] == [(1, 2.0), (2, 2.0), (3, 2.0)]
    assert [s for s, _ in scalars["clients/a/train_loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["clients/b/train_size"]] == [30.0, 30.0, 30.0]
    # FedAvg of +1 (10 images) and +4 (30 images) moves every float tensor by 3.25 per round
    floats = [v for v in server.global_weights.values() if v.is_floating_point()]
    norm = 3.25 * float(torch.sqrt(torch.tensor(float(sum(v.numel() for v in floats)))))
    assert [v for _, v in scalars["update/norm"]] == [pytest.approx(norm, rel=1e-4)] * 3
    assert "update/tensor_norms" in tags["histograms"]
    histogram = acc.Histograms("update/tensor_norms")
    assert [h.step for h in histogram] == [1, 2, 3]
    assert histogram[0].histogram_value.num == len(floats)  # one norm per floating-point tensor
    # the config as text, secrets hidden; the outcome at the end
    assert "config/text_summary" in tags["tensors"]
    config_text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "aggregator:" in config_text and "hunter2" not in config_text and "'***'" in config_text
    outcome = acc.Tensors("run/outcome/text_summary")[0].tensor_proto.string_val[0].decode()
    assert outcome.startswith("completed")
    assert observer.writer is None  # closed at the end of the run


def test_without_tensorboard_it_says_how_to_install_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(tb, "_summary_writer_class", lambda: None)
    with caplog.at_level(logging.WARNING, logger="fedplug.observers.tensorboard"):
        status, server, _ = _run(tmp_path, tb.TensorBoardObserver())
    assert status == 0 and len(server.history) == 3
    assert "pip install 'fedplug[tensorboard]'" in caplog.text and "plugins.disable=[tensorboard]" in caplog.text
    assert not (tmp_path / "tensorboard").exists()


def test_update_norms_skip_integer_buffers_and_mismatched_tensors():
    new = {"w": torch.ones(2, 2), "n": torch.tensor(5), "odd": torch.zeros(3)}
    old = {"w": torch.zeros(2, 2), "n": torch.tensor(1), "odd": torch.zeros(4)}
    assert tb.update_norms(new, old) == {"w": pytest.approx(2.0)}
