"""The shared detector engine (plugins/detectors/engine.py), on toy models that follow the detector convention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedplug.types import DetectionStats, EvalSettings, TrainSettings
from fedplug_plugins.detectors import engine

torch.set_num_threads(1)


class ToyDetector(nn.Module):
    """Predicts one box per image from the image's mean colour: torchvision's calling convention, tiny.

    Train mode returns a mean-reduced squared error (so gradient accumulation
    can be compared with big batches); eval mode returns one detection per image.
    """

    def __init__(self, nan_loss: bool = False, batchnorm: bool = False) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(3) if batchnorm else nn.Identity()
        self.lin = nn.Linear(3, 4)
        self.class_names = ("thing",)
        self.nan_loss = nan_loss

    def _boxes(self, images):
        x = torch.stack([im.mean(dim=(1, 2)) for im in images])
        raw = self.lin(self.norm(x)) * 4
        return torch.cat([raw[:, :2], raw[:, :2] + 8 + raw[:, 2:].abs()], dim=1) + 10

    def forward(self, images, targets=None):
        boxes = self._boxes(images)
        if self.training:
            goal = torch.stack([t["boxes"][0] for t in targets])
            loss = ((boxes - goal) ** 2).mean() / 100
            if self.nan_loss:
                loss = loss * float("nan")
            return {"loss_box": loss, "loss_const": loss.detach() * 0 + 0.5}
        return [
            {"boxes": b[None], "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.int64)} for b in boxes
        ]


def toy_data(n: int = 8, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        image = torch.rand(3, 8, 8, generator=g)
        xy = torch.rand(2, generator=g) * 20 + 5
        box = torch.cat([xy, xy + 10]).unsqueeze(0)
        data.append((image, {"boxes": box, "labels": torch.ones(1, dtype=torch.int64)}))
    return data


def toy_model(seed: int = 0, **kw) -> ToyDetector:
    torch.manual_seed(seed)
    return ToyDetector(**kw)


def settings(**kw) -> TrainSettings:
    base = dict(round_number=1, local_epochs=1, batch_size=4, lr=0.05, momentum=0.0, weight_decay=0.0,
                max_grad_norm=0.0, seed=3)
    base.update(kw)
    return TrainSettings(**base)


def weights_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- training


def test_one_round_trains_and_reports():
    model = toy_model()
    before = weights_of(model)
    result = engine.train_one_round(model, toy_data(), settings(local_epochs=3), before, {})
    assert result.ok and result.reason == ""
    assert result.num_examples == 8
    assert math.isfinite(result.train_loss)
    assert any(not torch.equal(before[k], result.weights[k]) for k in before)
    assert all(v.device.type == "cpu" for v in result.weights.values())
    assert result.metrics["steps"] == 6.0  # 2 batches x 3 epochs
    assert result.metrics["loss_const"] == pytest.approx(0.5)
    assert result.train_loss == pytest.approx(result.metrics["loss_box"] + 0.5)


def test_loss_falls_over_rounds():
    model, data, state = toy_model(), toy_data(16), {}
    losses = []
    for rnd in range(1, 4):
        r = engine.train_one_round(model, data, settings(round_number=rnd, local_epochs=3, momentum=0.9), None, state)
        losses.append(r.train_loss)
    assert losses[2] < losses[0]


def test_non_finite_loss_fails_the_round_without_raising():
    model = toy_model(nan_loss=True)
    before = weights_of(model)
    result = engine.train_one_round(model, toy_data(), settings(), before, {})
    assert not result.ok
    assert result.weights is None
    assert "non-finite" in result.reason and "loss_box=nan" in result.reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no step was taken


def test_exploding_weights_fail_the_round():
    result = engine.train_one_round(toy_model(), toy_data(), settings(lr=1e30, local_epochs=3), None, {})
    assert not result.ok and "non-finite" in result.reason


def test_training_is_deterministic_for_a_seed():
    def run(seed):
        model = toy_model()
        return engine.train_one_round(model, toy_data(), settings(batch_size=2, momentum=0.9, seed=seed), None, {})

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    assert any(not torch.equal(a.weights[k], c.weights[k]) for k in a.weights)


def test_caller_rng_state_is_untouched():
    model, data = toy_model(), toy_data()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.train_one_round(model, data, settings(), None, {})
    assert torch.equal(torch.rand(3), expected)


def test_proximal_term_adds_mu_times_distance_to_the_gradient():
    # One full-batch plain-SGD step: w1 = w0 - lr * (g + mu * (w0 - w_global)).
    lr, mu = 0.05, 0.7
    data = toy_data(4)
    plain_model, prox_model = toy_model(), toy_model()
    w0 = weights_of(plain_model)
    torch.manual_seed(99)
    w_global = {k: v + torch.randn_like(v) for k, v in w0.items()}
    plain = engine.train_one_round(plain_model, data, settings(lr=lr), w_global, {})
    prox = engine.train_one_round(prox_model, data, settings(lr=lr, proximal_mu=mu), w_global, {})
    assert plain.ok and prox.ok
    for k in w0:
        expected = plain.weights[k] - lr * mu * (w0[k] - w_global[k])
        torch.testing.assert_close(prox.weights[k], expected, rtol=1e-5, atol=1e-6)
    # mu/2 * ||w0 - w_global||^2 at the only step
    sq = sum(float(((w0[k] - w_global[k]) ** 2).sum()) for k in w0)
    assert prox.metrics["proximal_term"] == pytest.approx(0.5 * mu * sq, rel=1e-5)


def test_proximal_term_needs_global_weights():
    with pytest.raises(ValueError, match="global weights"):
        engine.train_one_round(toy_model(), toy_data(), settings(proximal_mu=0.1), None, {})
    with pytest.raises(ValueError, match="lack"):
        engine.train_one_round(toy_model(), toy_data(), settings(proximal_mu=0.1), {"lin.weight": torch.zeros(4, 3)}, {})


@pytest.mark.parametrize("batch_size, accum", [(2, 2), (1, 4), (2, 3)])
def test_gradient_accumulation_equals_the_big_batch(batch_size, accum):
    # 8 images: batch 4 x 1 step per group of 4 images, vs batch_size x accum micro-batches.
    # (2, 3): groups of 3 micro-batches (6 images) then a short group of 1 micro-batch (2 images),
    # which equals batch sizes 6 then 2.
    data = toy_data(8)
    big_bs = batch_size * accum
    ref = engine.train_one_round(toy_model(), data, settings(batch_size=big_bs, local_epochs=2), None, {})
    acc = engine.train_one_round(
        toy_model(), data, settings(batch_size=batch_size, grad_accum_steps=accum, local_epochs=2), None, {}
    )
    assert ref.metrics["steps"] == acc.metrics["steps"]
    for k in ref.weights:
        torch.testing.assert_close(acc.weights[k], ref.weights[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_optimizer_state_kept_or_reset_across_rounds(optimizer):
    data = toy_data()
    kw = dict(optimizer=optimizer, momentum=0.9, lr=0.01)

    def two_rounds(keep: bool):
        model, state = toy_model(), {}
        engine.train_one_round(model, data, settings(round_number=1, keep_optimizer_state=keep, **kw), None, state)
        kept = "optimizer" in state
        r2 = engine.train_one_round(model, data, settings(round_number=2, keep_optimizer_state=keep, **kw), None, state)
        return kept, r2, state

    kept, r_keep, state_keep = two_rounds(True)
    assert kept and r_keep.metrics["optimizer_state_restored"] == 1.0
    saved = state_keep["optimizer"]["state"]
    if optimizer == "adam":
        assert float(saved[0]["step"]) == 4.0  # 2 steps per round, counted across both rounds
    else:
        assert "momentum_buffer" in saved[0]
    assert all(t.device.type == "cpu" for s in saved.values() for t in s.values() if torch.is_tensor(t))

    kept, r_reset, state_reset = two_rounds(False)
    assert not kept and "optimizer" not in state_reset and r_reset.metrics["optimizer_state_restored"] == 0.0
    assert any(not torch.equal(r_keep.weights[k], r_reset.weights[k]) for k in r_keep.weights)

    # A stale state from another optimiser is not loaded.
    model = toy_model()
    other = "adam" if optimizer == "sgd" else "sgd"
    state = {}
    engine.train_one_round(model, data, settings(keep_optimizer_state=True, optimizer=other), None, state)
    r = engine.train_one_round(model, data, settings(round_number=2, keep_optimizer_state=True, **kw), None, state)
    assert r.metrics["optimizer_state_restored"] == 0.0


def test_lr_factor_warmup_and_schedules():
    s = settings(warmup_iters=10, lr_schedule="constant")
    assert engine.lr_factor(s, 0, 100) == pytest.approx(0.001)
    assert engine.lr_factor(s, 5, 100) == pytest.approx(0.001 + 0.999 * 0.5)
    assert engine.lr_factor(s, 10, 100) == 1.0
    cos = settings(lr_schedule="cosine")
    assert engine.lr_factor(cos, 0, 100) == pytest.approx(1.0)
    assert engine.lr_factor(cos, 50, 100) == pytest.approx(0.5)
    step = settings(lr_schedule="step")
    assert [engine.lr_factor(step, i, 100) for i in (0, 69, 70, 89, 90)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    # A run-wide schedule: round 3 of 4 starts half-way; warm-up only in round 1.
    run_wide = settings(round_number=3, lr_schedule="cosine", warmup_iters=10, extra={"total_rounds": 4})
    assert engine.lr_factor(run_wide, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    first = settings(round_number=1, lr_schedule="cosine", warmup_iters=10, extra={"total_rounds": 4})
    assert engine.lr_factor(first, 0, 10) == pytest.approx(0.001)


def test_schedule_is_applied_to_the_optimizer():
    r = engine.train_one_round(toy_model(), toy_data(), settings(lr=0.1, warmup_iters=100), None, {})
    assert r.metrics["lr"] == pytest.approx(0.1 * (0.001 + 0.999 * 1 / 100))  # the second of two steps


def test_gradient_clipping_limits_the_step():
    lr = 1.0
    w0 = weights_of(toy_model())
    r = engine.train_one_round(toy_model(), toy_data(4), settings(lr=lr, max_grad_norm=1e-3), None, {})
    moved = math.sqrt(sum(float(((r.weights[k] - w0[k]) ** 2).sum()) for k in w0))
    assert moved == pytest.approx(lr * 1e-3, rel=1e-3)


def test_amp_flag_is_ignored_on_cpu():
    r = engine.train_one_round(toy_model(), toy_data(), settings(amp=True), None, {})
    assert r.ok


@pytest.mark.parametrize(
    "change, key",
    [
        ({"optimizer": "rmsprop"}, "train.optimizer"),
        ({"lr_schedule": "poly"}, "train.lr_schedule"),
        ({"local_epochs": 0}, "train.local_epochs"),
        ({"grad_accum_steps": 0}, "train.grad_accum_steps"),
        ({"lr": float("nan")}, "train.lr"),
        ({"device": "tpu"}, "device='tpu'"),
    ],
)
def test_bad_settings_name_the_key(change, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("(", r"\(")):
        engine.train_one_round(toy_model(), toy_data(), settings(**change), None, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        engine.resolve_device("cuda")
    assert engine.resolve_device("auto").type == "cpu"


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="empty"):
        engine.train_one_round(toy_model(), [], settings(), None, {})


# --------------------------------------------------------------------------- evaluation


def test_evaluate_reports_metrics_and_changes_nothing():
    model = toy_model(batchnorm=True)
    data = toy_data(6)
    engine.train_one_round(model, data, settings(local_epochs=2), None, {})  # BN running stats move
    model.train()
    before = weights_of(model)
    result = engine.evaluate(model, data, EvalSettings(batch_size=4))
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert result.num_examples == 6
    assert isinstance(result.stats, DetectionStats) and result.stats.num_ground_truth == [6]
    assert 0.0 <= result.map50 <= 1.0 and 0.0 <= result.recall <= 1.0
    assert math.isfinite(result.loss) and result.loss > 0.5  # includes the constant 0.5 component
    assert {"coco_map", "coco_map50", "coco_map75", "num_detections"} <= set(result.metrics)
    assert result.metrics["num_detections"] == 6.0
    # evaluating twice gives the same figures
    again = engine.evaluate(model, data, EvalSettings(batch_size=3))
    assert again.loss == pytest.approx(result.loss) and again.map50 == result.map50


def test_evaluate_counts_hits_exactly():
    # Targets placed exactly where the model predicts: every detection is a true positive.
    model = toy_model().eval()
    images = [torch.rand(3, 8, 8) for _ in range(4)]
    with torch.no_grad():
        boxes = model._boxes(images)
    data = [(im, {"boxes": b[None].clone(), "labels": torch.ones(1, dtype=torch.int64)}) for im, b in zip(images, boxes)]
    data[3][1]["boxes"] += 100.0  # one miss
    result = engine.evaluate(model, data, EvalSettings())
    assert result.recall == pytest.approx(0.75)
    # All four detections score 1.0, so they enter the PR curve together: one point at
    # recall 0.75 and precision 0.75, hence AP = 0.75 * 0.75.
    assert result.map50 == pytest.approx(0.5625)
    assert result.metrics["ap/thing"] == pytest.approx(0.5625)


def test_score_threshold_drops_detections():
    model = toy_model()
    result = engine.evaluate(model, toy_data(4), EvalSettings(score_threshold=1.5))
    assert result.metrics["num_detections"] == 0.0 and result.recall == 0.0


def test_loss_mode_freezes_normalisation_and_dropout():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model.eval()
    with engine.loss_mode(model):
        assert model.training and model[0].training
        assert not model[1].training and not model[2].training
    assert not any(m.training for m in model.modules())
