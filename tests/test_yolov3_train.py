"""YOLOv3 plugin: the loss, training through the shared engine, and learning on synthetic data."""

from __future__ import annotations

import math
import time

import pytest
import torch

from fedplug.types import EvalSettings, TrainSettings
from fedplug_plugins.detectors import yolov3 as plugin
from fedplug_plugins.detectors.yolov3.loss import yolo_loss
from fedplug_plugins.detectors.yolov3.model import build_yolov3

torch.set_num_threads(1)


def drawn_images(n: int, size: int = 128, seed: int = 0):
    """``n`` images of flat coloured rectangles on grey noise, with their targets (classes 1..3)."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9], [0.95, 0.85, 0.1]])
    data = []
    for _ in range(n):
        img = 0.45 + 0.05 * torch.rand(3, size, size, generator=g)
        boxes, labels = [], []
        for j in range(2):
            w, h = (torch.randint(14, 40, (2,), generator=g)).tolist()
            x0 = int(torch.randint(0, size // 2 - w // 2, (1,), generator=g)) + j * size // 2
            y0 = int(torch.randint(0, size - h, (1,), generator=g))
            x0 = min(x0, size - w)
            c = int(torch.randint(0, 3, (1,), generator=g))
            img[:, y0 : y0 + h, x0 : x0 + w] = colours[c][:, None, None]
            boxes.append([x0, y0, x0 + w, y0 + h])
            labels.append(c + 1)
        data.append((img, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}))
    return data


# ----------------------------------------------------------------------------- the loss


def test_non_best_anchor_overlapping_the_truth_is_ignored_by_objectness():
    """A confident non-responsible prediction on a ground truth costs nothing below the ignore threshold."""
    model = build_yolov3({}, 1)
    s = model.settings
    k = 1
    maps = [torch.zeros(1, len(m) * (5 + k), s.img_size // st, s.img_size // st) for m, st in zip(s.anchor_masks, s.strides)]
    for m in maps:
        m.view(1, 3, 6, *m.shape[2:])[:, :, 4] = -10.0  # confident background everywhere
    # Ground truth shaped exactly like anchor 0 (fine scale), centred in fine cell (row 4, col 4).
    aw, ah = s.anchors[0]
    cx, cy = 4.5 * 8, 4.5 * 8
    targets = torch.tensor([[0, 0, cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2]])
    # Anchor 1 of the same cell predicts the same box (tw, th stretch it to anchor 0's shape), confidently.
    a1w, a1h = s.anchors[1]
    fine = maps[1].view(1, 3, 6, 16, 16)
    fine[0, 1, 2, 4, 4], fine[0, 1, 3, 4, 4] = math.log(aw / a1w), math.log(ah / a1h)
    fine[0, 1, 4, 4, 4] = 10.0

    def obj(threshold):
        return yolo_loss(maps, targets, 1, model.anchors, s.anchor_masks, s.strides, s.img_size, k,
                         ignore_threshold=threshold)["loss_obj"].item()

    ignored, punished = obj(0.5), obj(1.0)
    assert punished - ignored == pytest.approx(10.0, abs=1e-3)  # BCE(logit 10, target 0) = 10.00005
    # The responsible prediction (anchor 0, at logit -10) is what remains: about 10 too.
    assert ignored == pytest.approx(10.0, abs=0.05)


def test_loss_terms_for_an_image_without_objects():
    model = build_yolov3({}, 3).train()
    losses = model([torch.rand(3, 128, 128)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert losses["loss_box"].item() == 0.0 and losses["loss_cls"].item() == 0.0
    assert losses["loss_obj"].item() > 0.0


def test_giou_box_loss_is_available():
    model = build_yolov3({"box_loss": "giou"}, 3).train()
    img, tgt = drawn_images(1)[0]
    losses = model([img], [tgt])
    assert 0.0 < losses["loss_box"].item() < 2 * 2 * 2  # (1 - GIoU) <= 2 per box, weight <= 2, two boxes


@pytest.mark.slow
def test_loss_is_finite_and_falls_when_overfitting_two_images():
    model = build_yolov3({}, 3).train()
    data = drawn_images(2)
    images, targets = [d[0] for d in data], [d[1] for d in data]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        losses = model(images, targets)
        total = sum(losses.values())
        assert torch.isfinite(total)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append({k: v.item() for k, v in losses.items()})
    first, last = history[0], history[-1]
    assert sum(last.values()) < 0.3 * sum(first.values())
    assert last["loss_box"] < first["loss_box"] and last["loss_obj"] < 0.3 * first["loss_obj"]


# ----------------------------------------------------------------------------- through the engine (the hooks)


def test_train_round_hook_trains_through_the_engine():
    model = plugin.fedplug_build_model(config={"name": "yolov3"}, class_names=["a", "b", "c"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(round_number=1, local_epochs=1, batch_size=2, lr=1e-3, optimizer="adam", weight_decay=0.0)
    result = plugin.fedplug_train_round(model=model, dataset=drawn_images(4), settings=settings,
                                        global_weights=start, state={})
    assert result.ok and result.num_examples == 4 and math.isfinite(result.train_loss)
    assert set(result.weights) == set(start)
    assert not torch.equal(result.weights["body.out_fine.weight"], start["body.out_fine.weight"])
    for term in ("loss_box", "loss_obj", "loss_cls"):  # the engine reports each term's mean
        assert any(term in key and math.isfinite(v) for key, v in result.metrics.items())


def test_non_finite_loss_fails_the_round_instead_of_raising():
    model = plugin.fedplug_build_model(config={"name": "yolov3"}, class_names=["a", "b", "c"])
    data = drawn_images(2)
    data[0] = (torch.full_like(data[0][0], float("nan")), data[0][1])
    settings = TrainSettings(round_number=1, local_epochs=1, batch_size=2, optimizer="adam", lr=1e-3)
    result = plugin.fedplug_train_round(model=model, dataset=data, settings=settings,
                                        global_weights=model.state_dict(), state={})
    assert not result.ok and "non-finite" in result.reason


@pytest.mark.slow
def test_full_size_darknet53_trains_one_step_and_evaluates_on_cpu():
    # The published architecture (checked parameter for parameter in test_yolov3_model.py) at a
    # small input: 160 px keeps one CPU step to a few seconds; one image per batch.
    model = plugin.fedplug_build_model(
        config={"name": "yolov3", "variant": "darknet53", "img_size": 160}, class_names=["a", "b", "c"]
    )
    assert sum(p.numel() for p in model.parameters()) == 61_491_424 + 5_385 * 8
    data = drawn_images(1, size=160)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(round_number=1, local_epochs=1, batch_size=1, optimizer="sgd", lr=1e-4)
    result = plugin.fedplug_train_round(model=model, dataset=data, settings=settings, global_weights=start, state={})
    assert result.ok and result.metrics["steps"] == 1.0 and math.isfinite(result.train_loss)
    assert not torch.equal(result.weights["body.backbone.stem.conv.weight"], start["body.backbone.stem.conv.weight"])
    evaluation = plugin.fedplug_evaluate(model=model, dataset=data, settings=EvalSettings(batch_size=1))
    assert evaluation.num_examples == 1 and math.isfinite(evaluation.loss)
    assert evaluation.stats.num_classes == 3 and 0.0 <= evaluation.map50 <= 1.0


@pytest.mark.slow
def test_nano_map_rises_on_synthetic_street_data(tmp_path):
    """The CPU variant learns the synthetic federation's data: mAP@0.5 from ~0 to clearly above."""
    from fedplug.data.synthetic import CLASSES, generate_synthetic_federation
    from fedplug.data.voc import VOCDetection

    (root,) = generate_synthetic_federation(tmp_path / "synthetic", num_clients=1, train_per_client=48,
                                            test_per_client=16)
    train, test = VOCDetection(root, "train", CLASSES), VOCDetection(root, "test", CLASSES)
    model = plugin.fedplug_build_model(config={"name": "yolov3", "seed": 0}, class_names=CLASSES)
    eval_settings = EvalSettings(batch_size=16)
    before = plugin.fedplug_evaluate(model=model, dataset=test, settings=eval_settings)
    t0 = time.monotonic()
    maps = []
    for rnd in range(1, 5):  # 4 "rounds" of 3 local epochs = 12 epochs of 48 images
        settings = TrainSettings(round_number=rnd, local_epochs=3, batch_size=8, optimizer="adam", lr=1e-3,
                                 weight_decay=0.0, warmup_iters=10, max_grad_norm=10.0)
        result = plugin.fedplug_train_round(model=model, dataset=train, settings=settings,
                                            global_weights=model.state_dict(), state={})
        assert result.ok, result.reason
        maps.append(plugin.fedplug_evaluate(model=model, dataset=test, settings=eval_settings).map50)
    seconds = time.monotonic() - t0
    print(f"nano on synthetic data: mAP@0.5 {before.map50:.3f} -> {maps} in {seconds:.0f} s")
    assert before.map50 < 0.1
    assert max(maps[-2:]) > 0.45 and max(maps[-2:]) > before.map50 + 0.4
    assert maps[-1] > maps[0] + 0.3
