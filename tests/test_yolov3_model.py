"""YOLOv3 plugin: architecture, config, decoding, NMS and the eval-mode contract.

Fast tests: tiny inputs, one CPU thread.  Training lives in test_yolov3_train.py,
Darknet weight files in test_yolov3_darknet.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedplug_plugins.detectors import yolov3 as plugin
from fedplug_plugins.detectors.yolov3.decode import postprocess
from fedplug_plugins.detectors.yolov3.letterbox import boxes_to_input, boxes_to_original, letterbox
from fedplug_plugins.detectors.yolov3.model import YOLOv3, build_yolov3
from fedplug_plugins.detectors.yolov3.settings import ConfigError, parse_settings

torch.set_num_threads(1)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- parameter counts


def darknet53_params(k: int) -> int:
    """docs/yolov3.md: 61,491,424 + 5,385 * (5 + K) for YOLOv3 (Darknet-53) with K classes."""
    return 61_491_424 + 5_385 * (5 + k)


def test_full_size_yolov3_has_the_published_parameter_count():
    model = build_yolov3({"variant": "darknet53", "img_size": 416}, 80)
    assert n_params(model) == 61_949_149  # the published count for COCO's 80 classes at 416 px
    assert darknet53_params(80) == 61_949_149
    assert len(model.darknet_convs()) == 75  # yolov3.cfg's 75 [convolutional] sections


@pytest.mark.parametrize("k", [1, 7, 20])
def test_full_size_parameter_count_for_other_class_numbers(k):
    model = build_yolov3({"variant": "darknet53"}, k)
    assert n_params(model) == darknet53_params(k)


@pytest.mark.parametrize("k", [80, 7])
def test_tiny_parameter_count(k):
    # 8,852,366 is YOLOv3-tiny's published count at 80 classes; 8,656,016 + 2,310 * (5 + K) in general.
    model = build_yolov3({"variant": "tiny"}, k)
    assert n_params(model) == 8_656_016 + 2_310 * (5 + k)
    if k == 80:
        assert n_params(model) == 8_852_366


def test_darknet_layer_indices_follow_the_cfg_files():
    full = build_yolov3({"variant": "darknet53"}, 80).darknet_convs()
    # darknet53.conv.74 holds exactly the 52 backbone convolutions (cfg layers < 74).
    assert sum(c.layer < 74 for c in full) == 52
    assert [c.layer for c in full if c.is_output] == [81, 93, 105]  # the convs before [yolo] 82, 94, 106
    tiny = build_yolov3({"variant": "tiny"}, 80).darknet_convs()
    assert [c.layer for c in tiny] == [0, 2, 4, 6, 8, 10, 12, 13, 14, 15, 18, 21, 22]
    assert [c.layer for c in tiny if c.is_output] == [15, 22]


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "variant,img_size,strides",
    [("nano", 128, (16, 8)), ("tiny", 64, (32, 16)), ("darknet53", 64, (32, 16, 8))],
)
def test_raw_outputs_have_one_map_per_scale(variant, img_size, strides):
    k = 4
    model = build_yolov3({"variant": variant, "img_size": img_size}, k).eval()
    assert model.settings.strides == strides
    with torch.no_grad():
        maps = model.raw_outputs(torch.rand(2, 3, img_size, img_size))
    assert len(maps) == len(strides)
    for m, stride, mask in zip(maps, strides, model.settings.anchor_masks):
        assert m.shape == (2, len(mask), img_size // stride, img_size // stride, 5 + k)


def test_anchors_are_the_published_pixels_at_any_img_size_as_in_darknet():
    """Darknet never rescales anchors: yolov3.cfg at width=608 keeps the 416-px anchors."""
    s416 = parse_settings({"variant": "darknet53"}, 80)
    assert s416.anchors[0] == (10, 13) and s416.anchors[-1] == (373, 326)
    assert s416.anchor_masks == ((6, 7, 8), (3, 4, 5), (0, 1, 2)) and not s416.scale_anchors
    for size in (320, 608):
        assert parse_settings({"variant": "darknet53", "img_size": size}, 80).anchors == s416.anchors
    tiny = parse_settings({"variant": "tiny"}, 80)
    assert len(tiny.anchors) == 6 and tiny.anchor_masks == ((3, 4, 5), (1, 2, 3))
    assert parse_settings({"variant": "tiny", "img_size": 608}, 80).anchors == tiny.anchors
    nano = parse_settings({}, 3)
    assert nano.variant == "nano" and nano.img_size == 128
    assert all(10 <= max(w, h) <= 50 for w, h in nano.anchors)
    assert parse_settings({"img_size": 256}, 3).anchors == nano.anchors


def test_scale_anchors_is_an_explicit_option():
    s320 = parse_settings({"variant": "darknet53", "img_size": 320, "scale_anchors": True}, 80)
    assert s320.scale_anchors and s320.anchors[-1] == pytest.approx((373 * 320 / 416, 326 * 320 / 416))
    assert parse_settings({"variant": "darknet53", "scale_anchors": True}, 80).anchors[-1] == (373, 326)
    tiny = parse_settings({"variant": "tiny", "img_size": 608, "scale_anchors": True}, 80)
    assert tiny.anchors[0] == pytest.approx((10 * 608 / 416, 14 * 608 / 416))
    nano = parse_settings({}, 3)
    nano256 = parse_settings({"img_size": 256, "scale_anchors": True}, 3)  # nano's anchors are for 128 px
    assert nano256.anchors == tuple((2 * w, 2 * h) for w, h in nano.anchors)
    given = parse_settings({"anchors": [[5, 6], [7, 8]], "anchor_masks": [[1], [0]], "scale_anchors": False}, 3)
    assert given.anchors == ((5, 6), (7, 8))


def test_darknet53_at_608_decodes_published_weights_as_darknet_does():
    """Darknet: w = exp(tw) * anchor_w / net.w in units of the input, i.e. anchor_w pixels at tw = 0, at 608 too."""
    model = build_yolov3({"variant": "darknet53", "img_size": 608}, 80)
    s = model.settings
    # Coarsest scale (stride 32, a 19 x 19 grid), its anchor 2 = anchor 8 = 373 x 326, cell (row 9, col 9):
    # centre (9.5 * 32, 9.5 * 32) = (304, 304), size = the anchor in pixels.
    model.body = _FixedBody(_one_detection_maps(s, 0, 2, (9, 9), cls=5))
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 608, 608)])
    assert det["labels"].tolist() == [6]
    expected = torch.tensor([304 - 373 / 2, 304 - 326 / 2, 304 + 373 / 2, 304 + 326 / 2])
    assert torch.allclose(det["boxes"][0], expected, atol=1e-3)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "cfg,key",
    [
        ({"variant": "yolov9"}, "model.variant"),
        ({"variant": "darknet53", "img_size": 400}, "model.img_size"),
        ({"img_size": "big"}, "model.img_size"),
        ({"anchors": [[10, 0]]}, "model.anchors"),
        ({"anchor_masks": [[0, 1, 2]]}, "model.anchor_masks"),
        ({"anchor_masks": [[0, 1, 9], [3, 4, 5]]}, "model.anchor_masks"),
        ({"box_loss": "ciou"}, "model.box_loss"),
        ({"conf_threshold": 2}, "model.conf_threshold"),
        ({"nms_iou": -0.1}, "model.nms_iou"),
        ({"loss_gains": {"boxes": 1.0}}, "model.loss_gains"),
        ({"lr": 0.1}, "model.lr"),
        ({"scale_anchors": "yes"}, "model.scale_anchors"),
        ({"scale_anchors": True, "anchors": [[10, 10]], "anchor_masks": [[0], [0]]}, "model.scale_anchors"),
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_yolov3(cfg, 3)


def test_build_hook_is_deterministic_for_a_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = plugin.fedplug_build_model(config={"name": "yolov3", "seed": 5}, class_names=["a", "b"])
    assert torch.rand(1).item() == before.item()  # building used a private RNG
    b = plugin.fedplug_build_model(config={"name": "yolov3", "seed": 5}, class_names=["a", "b"])
    c = plugin.fedplug_build_model(config={"name": "yolov3", "seed": 6}, class_names=["a", "b"])
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.class_names == ("a", "b") and a.settings.num_classes == 2
    assert not any("anchor" in k for k in sa)  # anchors come from the config, they do not travel


def test_model_is_found_through_its_entry_point():
    from fedplug.plugins import load_plugin

    _, module = load_plugin("detector", "yolov3")
    assert module.fedplug_build_model is plugin.fedplug_build_model


def test_output_biases_start_at_the_priors():
    model = build_yolov3({}, 3)
    for conv, stride in zip(model.output_convs(), model.settings.strides):
        b = conv.bias.view(3, 8)
        assert torch.allclose(b[:, 4], torch.full((3,), math.log(8 / (128 / stride) ** 2)))


# ----------------------------------------------------------------------------- letterbox


def test_letterbox_places_and_maps_back():
    img = torch.rand(3, 60, 120)
    batch, (p,) = letterbox([img], 128)
    assert batch.shape == (1, 3, 128, 128)
    assert p.scale == pytest.approx(128 / 120) and p.left == 0 and p.top == 32
    assert torch.all(batch[0, :, :32] == 0.5) and torch.all(batch[0, :, 96:] == 0.5)  # grey bars
    boxes = torch.tensor([[10.0, 5.0, 50.0, 40.0]])
    on_input = boxes_to_input(boxes, p)
    assert torch.allclose(on_input, torch.tensor([[10 * 128 / 120, 5 * 128 / 120 + 32, 50 * 128 / 120, 40 * 128 / 120 + 32]]))
    assert torch.allclose(boxes_to_original(on_input, p), boxes, atol=1e-4)


def test_letterbox_rejects_bad_images():
    with pytest.raises(ValueError, match="float"):
        letterbox([torch.zeros(3, 8, 8, dtype=torch.uint8)], 32)
    with pytest.raises(ValueError, match=r"\[C,H,W\]"):
        letterbox([torch.zeros(8, 8)], 32)


# ----------------------------------------------------------------------------- decoding, NMS, mapping back


class _FixedBody(nn.Module):
    """Stands in for the network: returns fixed raw maps whatever the input."""

    def __init__(self, maps):
        super().__init__()
        self.maps = maps
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return [m.expand(x.shape[0], *m.shape[1:]).clone() for m in self.maps]

    def darknet_convs(self):
        return []


def _one_detection_maps(settings, scale_index, anchor, cell, txy=(0.0, 0.0), cls=0, logit=8.0):
    """Raw maps with every objectness at -20 except one prediction, which decodes to a known box."""
    k = settings.num_classes
    maps = []
    for s, (mask, stride) in enumerate(zip(settings.anchor_masks, settings.strides)):
        g = settings.img_size // stride
        m = torch.zeros(1, len(mask), 5 + k, g, g)
        m[:, :, 4] = -20.0
        m[:, :, 5:] = -20.0
        if s == scale_index:
            gy, gx = cell
            m[0, anchor, 0, gy, gx], m[0, anchor, 1, gy, gx] = txy
            m[0, anchor, 4, gy, gx] = logit
            m[0, anchor, 5 + cls, gy, gx] = logit
        maps.append(m.view(1, len(mask) * (5 + k), g, g))
    return maps


def test_eval_output_is_torchvision_format_in_original_image_pixels():
    model = build_yolov3({"variant": "nano"}, 3)
    s = model.settings
    # Scale 1 (stride 8), anchor 0 of that scale, cell (row 6, col 4): centre (4.5*8, 6.5*8) = (36, 52)
    # on the 128-px input, size = the anchor, since tw = th = 0.
    maps = _one_detection_maps(s, 1, 0, (6, 4), cls=2)
    model.body = _FixedBody(maps)
    model.eval()
    image = torch.rand(3, 72, 96)  # letterboxed: scale 4/3 (96 x 128), 16 px bars at top and bottom
    with torch.no_grad():
        (det,) = model([image])
    assert set(det) == {"boxes", "scores", "labels"}
    assert det["labels"].dtype == torch.int64 and det["labels"].tolist() == [3]  # class index 2 -> label 3
    aw, ah = s.anchors[s.anchor_masks[1][0]]
    expected_input = torch.tensor([36 - aw / 2, 52 - ah / 2, 36 + aw / 2, 52 + ah / 2])
    expected = (expected_input - torch.tensor([0.0, 16.0, 0.0, 16.0])) / (128 / 96)
    assert torch.allclose(det["boxes"][0], expected, atol=1e-3)
    assert det["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(8.0)).item() ** 2, rel=1e-5)


def test_boxes_are_clipped_to_the_original_image():
    model = build_yolov3({"variant": "nano"}, 3)
    # Top-left cell, anchor 2 of the coarse scale, grown 4x: it sticks out of the image.
    maps = _one_detection_maps(model.settings, 0, 2, (0, 0))
    maps[0].view(1, 3, 8, 8, 8)[0, 2, 2:4, 0, 0] = math.log(4.0)
    model.body = _FixedBody(maps)
    model.eval()
    with torch.no_grad():
        (det,) = model([torch.rand(3, 50, 100)])
    box = det["boxes"][0]
    assert box[0] == 0 and box[1] == 0 and box[2] <= 100 and box[3] <= 50


def test_nms_is_class_wise_and_confidence_threshold_applies():
    settings = parse_settings({"variant": "nano"}, 2)
    anchors = [torch.tensor(settings.anchors)[list(m)] for m in settings.anchor_masks]
    k = 2
    maps = _one_detection_maps(settings, 1, 0, (5, 5), cls=0)
    fine = maps[1].view(1, 3, 5 + k, 16, 16)
    # The same box again from the neighbouring anchor slot with the same shape: a duplicate.
    fine[0, 1, :, 5, 5] = fine[0, 0, :, 5, 5]
    fine[0, 1, 4, 5, 5] = 6.0
    anchors[1][1] = anchors[1][0]
    # A third, same place, but of class 1 (and not of class 0): survives class-wise NMS.
    fine[0, 2, :, 5, 5] = fine[0, 0, :, 5, 5]
    fine[0, 2, 5, 5, 5], fine[0, 2, 6, 5, 5] = -20.0, 5.0
    anchors[1][2] = anchors[1][0]
    (det,) = postprocess(maps, anchors, settings.strides, 0.01, 0.45, 100, 1000)
    assert sorted(det["labels"].tolist()) == [0, 1]
    assert det["scores"].max() == pytest.approx(torch.sigmoid(torch.tensor(8.0)).item() ** 2, rel=1e-5)
    # Without NMS (IoU threshold 1) the duplicate would be kept.
    (no_nms,) = postprocess(maps, anchors, settings.strides, 0.01, 1.0, 100, 1000)
    assert len(no_nms["labels"]) == 3
    # A confidence threshold above every score leaves nothing.
    (none,) = postprocess(maps, anchors, settings.strides, 0.9999, 0.45, 100, 1000)
    assert len(none["boxes"]) == 0
    (capped,) = postprocess(maps, anchors, settings.strides, 0.01, 1.0, 2, 1000)
    assert len(capped["boxes"]) == 2


def test_eval_mode_uses_batchnorm_running_statistics():
    """Detections of an image do not depend on the rest of the batch, and stats do not move."""
    model = build_yolov3({"variant": "nano", "conf_threshold": 0.0, "max_detections": 5}, 3).eval()
    running = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    a, b = torch.rand(3, 128, 128), torch.rand(3, 128, 128) * 0.2
    with torch.no_grad():
        alone = model([a])[0]
        together = model([a, b])[0]
    assert torch.allclose(alone["scores"], together["scores"], atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in running.items())


def test_engine_evaluation_runs_in_eval_mode_and_restores_train_mode():
    from fedplug.types import EvalSettings

    model = plugin.fedplug_build_model(config={"name": "yolov3"}, class_names=["a", "b"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen_modes = []
    hook = model.body.register_forward_pre_hook(
        lambda m, _: seen_modes.append(next(x for x in m.modules() if isinstance(x, nn.BatchNorm2d)).training)
    )
    data = [
        (torch.rand(3, 96, 128), {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([1])}),
        (torch.rand(3, 128, 128), {"boxes": torch.tensor([[50.0, 60.0, 70.0, 100.0]]), "labels": torch.tensor([2])}),
    ]
    result = plugin.fedplug_evaluate(model=model, dataset=data, settings=EvalSettings(batch_size=2))
    hook.remove()
    assert seen_modes and not any(seen_modes)  # BatchNorm was in eval mode for detections and the test loss
    assert model.training  # the caller's mode is back
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing moved
    assert result.num_examples == 2 and math.isfinite(result.loss) and result.loss > 0
    assert 0.0 <= result.map50 <= 1.0 and result.stats.num_classes == 2


def test_train_mode_contract_and_target_errors():
    model = build_yolov3({}, 3).train()
    images = [torch.rand(3, 100, 80), torch.rand(3, 128, 128)]
    targets = [
        {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # no objects
    ]
    losses = model(images, targets)
    assert set(losses) == {"loss_box", "loss_obj", "loss_cls"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="needs targets"):
        model(images)
    with pytest.raises(ValueError, match=r"1\.\.3"):
        model(images[:1], [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match="x2 > x1"):
        model(images[:1], [{"boxes": torch.tensor([[5.0, 1.0, 5.0, 5.0]]), "labels": torch.tensor([1])}])


def test_losses_and_detections_come_from_one_eval_mode_pass():
    model = build_yolov3({"conf_threshold": 0.0, "max_detections": 10}, 3).eval()
    images = [torch.rand(3, 128, 96)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([2])}]
    with torch.no_grad():
        losses, dets = model.losses_and_detections(images, targets)
        plain = model(images)
        raw = model.body(letterbox(images, 128)[0])
        expected = model.loss(raw, model._targets_on_input(targets, letterbox(images, 128)[1]), 1)
    assert torch.equal(dets[0]["boxes"], plain[0]["boxes"]) and torch.equal(dets[0]["scores"], plain[0]["scores"])
    assert all(torch.allclose(losses[k], expected[k]) for k in expected)
    assert not model.training


def test_yolov3_is_a_module_of_the_right_class():
    model = plugin.fedplug_build_model(config={"name": "yolov3", "variant": "tiny", "img_size": 64}, class_names=["x"])
    assert isinstance(model, YOLOv3) and model.settings.variant == "tiny"
