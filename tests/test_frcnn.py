"""The frcnn detector plugin: every backbone builds, trains a step and evaluates; the tiny model learns."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from fedplug.types import EvalResult, EvalSettings, TrainResult, TrainSettings
from fedplug_plugins.detectors import frcnn

torch.set_num_threads(1)

CLASSES = ("car", "person", "sign")


def one_image_data(height: int = 96, width: int = 128):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, height, width, generator=g)
    target = {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [70.0, 20.0, 100.0, 40.0]]),
              "labels": torch.tensor([2, 1])}
    return [(image, target)]


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- config and building


def test_tiny_builds_for_k_classes_with_background():
    for k in (1, 3, 7):
        model = frcnn.fedplug_build_model(config={"name": "frcnn"}, class_names=[f"c{i}" for i in range(k)])
        assert model.roi_heads.box_predictor.cls_score.out_features == k + 1
        assert model.class_names == tuple(f"c{i}" for i in range(k))
    assert 300_000 < frcnn.count_parameters(model) < 1_500_000  # a CPU-sized model


def test_build_is_deterministic_for_the_seed():
    a = frcnn.build_frcnn({"seed": 4}, CLASSES).state_dict()
    b = frcnn.build_frcnn({"seed": 4}, CLASSES).state_dict()
    c = frcnn.build_frcnn({"seed": 5}, CLASSES).state_dict()
    assert state_equal(a, b)
    assert not state_equal(a, c)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"backbone": "vgg16"}, "model.backbone='vgg16' is not one of"),
        ({"anchor_size": [8]}, "model.anchor_size is not a frcnn setting"),
        ({"backbone": "resnet50_fpn", "tiny_channels": [8, 8, 8]}, "model.tiny_channels applies to backbone=tiny"),
        ({"min_size": 0}, "model.min_size must be a positive integer"),
        ({"box_score_thresh": 2}, "model.box_score_thresh must be within"),
        ({"anchor_sizes": []}, "model.anchor_sizes"),
        ({"weights_backbone": "DEFAULT"}, "model.weights_backbone"),
    ],
)
def test_bad_config_names_the_key(config, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        frcnn.build_frcnn(config, CLASSES)


def test_empty_class_list_is_an_error():
    with pytest.raises(ValueError, match="at least one object class"):
        frcnn.build_frcnn({}, [])


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["tiny", "mobilenet_v3_large_320_fpn", "mobilenet_v3_large_fpn", "resnet50_fpn"])
def test_every_backbone_builds_trains_one_step_and_evaluates_on_cpu(backbone):
    # Full-size models at a small input size (min/max_size 128) to keep CPU time low; no pretrained weights.
    config = {"name": "frcnn", "backbone": backbone}
    if backbone != "tiny":
        config.update(min_size=128, max_size=128)
    model = frcnn.fedplug_build_model(config=config, class_names=CLASSES)
    assert model.roi_heads.box_predictor.cls_score.out_features == len(CLASSES) + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = one_image_data()
    result = frcnn.fedplug_train_round(
        model=model, dataset=data, settings=TrainSettings(round_number=1, batch_size=1, lr=0.001),
        global_weights=before, state={},
    )
    assert isinstance(result, TrainResult) and result.ok, result.reason
    assert math.isfinite(result.train_loss)
    assert result.weights.keys() == before.keys()
    assert any(not torch.equal(before[k], result.weights[k]) for k in before)
    ev = frcnn.fedplug_evaluate(model=model, dataset=data, settings=EvalSettings(batch_size=1))
    assert isinstance(ev, EvalResult)
    assert ev.num_examples == 1 and math.isfinite(ev.loss)
    assert 0.0 <= ev.map50 <= 1.0 and 0.0 <= ev.recall <= 1.0
    assert ev.stats.num_classes == len(CLASSES) and ev.stats.num_ground_truth == [1, 1, 0]


# --------------------------------------------------------------------------- weights


def test_weights_round_trip_through_safetensors_exactly():
    model = frcnn.build_frcnn({"seed": 1}, CLASSES)
    engine_data = one_image_data()
    frcnn.fedplug_train_round(model=model, dataset=engine_data,
                              settings=TrainSettings(round_number=1, batch_size=1), global_weights={}, state={})
    state = model.state_dict()
    blob = st_save({k: v.contiguous() for k, v in state.items()})
    other = frcnn.build_frcnn({"seed": 2}, CLASSES)
    assert not state_equal(other.state_dict(), state)
    other.load_state_dict(st_load(blob))
    assert state_equal(other.state_dict(), state)
    model.eval(), other.eval()
    with torch.no_grad():
        a, b = model([engine_data[0][0]])[0], other([engine_data[0][0]])[0]
    assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_local_weights_file(tmp_path):
    source = frcnn.build_frcnn({"seed": 7}, CLASSES)
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(st_save(source.state_dict()))
    loaded = frcnn.build_frcnn({"seed": 0, "weights": str(path)}, CLASSES)
    assert state_equal(loaded.state_dict(), source.state_dict())
    # A torch.save-d state dict works too (read with weights_only=True).
    pt = tmp_path / "tiny.pt"
    torch.save(source.state_dict(), pt)
    assert state_equal(frcnn.build_frcnn({"weights": str(pt)}, CLASSES).state_dict(), source.state_dict())
    # Another class count: everything but the class-specific predictor is loaded.
    five = frcnn.build_frcnn({"seed": 0, "weights": str(path)}, [f"c{i}" for i in range(5)])
    own = five.state_dict()
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == 6
    assert torch.equal(own["backbone.body.0.0.weight"], source.state_dict()["backbone.body.0.0.weight"])
    # Another architecture: a clear error.
    with pytest.raises(ValueError, match="does not fit this frcnn model"):
        frcnn.build_frcnn({"weights": str(path), "tiny_channels": [8, 16, 32]}, CLASSES)
    with pytest.raises(frcnn.PretrainedWeightsUnavailable, match="no such file|none exists"):
        frcnn.build_frcnn({"weights": str(tmp_path / "missing.safetensors")}, CLASSES)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(frcnn.PretrainedWeightsUnavailable, match="could not be read"):
        frcnn.build_frcnn({"weights": str(garbage)}, CLASSES)


@pytest.fixture
def empty_hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_pretrained_weights_offline_error(empty_hub_dir, monkeypatch):
    def no_download(*args, **kwargs):  # the plugin must fail before any download is attempted
        raise AssertionError("tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    for config in (
        {"backbone": "resnet50_fpn", "weights": "DEFAULT"},
        {"backbone": "mobilenet_v3_large_fpn", "weights_backbone": "IMAGENET1K_V1"},
    ):
        with pytest.raises(frcnn.PretrainedWeightsUnavailable) as info:
            frcnn.build_frcnn(config, CLASSES)
        message = str(info.value)
        assert "never downloads" in message and str(empty_hub_dir / "checkpoints") in message
        assert "https://download.pytorch.org/" in message and "model.weights" in message
    with pytest.raises(ValueError, match="COCO_V1"):
        frcnn.build_frcnn({"backbone": "resnet50_fpn", "weights": "NOT_A_WEIGHT"}, CLASSES)
    with pytest.raises(frcnn.PretrainedWeightsUnavailable, match="tiny backbone has no torchvision weights"):
        frcnn.build_frcnn({"weights": "DEFAULT"}, CLASSES)


@pytest.mark.slow
def test_cached_pretrained_weights_are_used_and_get_a_new_predictor(empty_hub_dir, monkeypatch):
    from torchvision.models.detection import FasterRCNN_MobileNet_V3_Large_320_FPN_Weights as W

    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    # Stand in for the published COCO checkpoint: a 91-class model's state dict, cached where torch hub looks.
    coco = frcnn.build_frcnn({"backbone": "mobilenet_v3_large_320_fpn", "seed": 3}, [f"c{i}" for i in range(90)])
    path = frcnn.cached_weights_path(W.COCO_V1)
    path.parent.mkdir(parents=True)
    torch.save(coco.state_dict(), path)
    model = frcnn.build_frcnn({"backbone": "mobilenet_v3_large_320_fpn", "weights": "DEFAULT"}, CLASSES)
    own = model.state_dict()
    assert own["roi_heads.box_predictor.cls_score.weight"].shape[0] == len(CLASSES) + 1
    key = "rpn.head.conv.0.0.weight"
    assert torch.equal(own[key], coco.state_dict()[key])


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_model_learns_synthetic_shapes_and_federated_map_is_exact(tmp_path):
    from fedplug.data import VOCDetection, generate_synthetic_federation
    from fedplug import metrics

    folders = generate_synthetic_federation(tmp_path / "data", num_clients=2, train_per_client=32,
                                            test_per_client=8, image_size=128, seed=3)
    train = torch.utils.data.ConcatDataset([VOCDetection(f, "train", CLASSES) for f in folders])
    tests = [VOCDetection(f, "test", CLASSES) for f in folders]
    test_all = torch.utils.data.ConcatDataset(tests)
    model = frcnn.build_frcnn({"seed": 0}, CLASSES)
    es = EvalSettings(batch_size=8)
    first = frcnn.fedplug_evaluate(model=model, dataset=test_all, settings=es)
    losses = []
    for rnd in range(1, 7):
        r = frcnn.fedplug_train_round(
            model=model, dataset=train,
            settings=TrainSettings(round_number=rnd, local_epochs=1, lr=0.02, batch_size=4, max_grad_norm=10.0),
            global_weights={}, state={},
        )
        assert r.ok, r.reason
        losses.append(r.train_loss)
    last = frcnn.fedplug_evaluate(model=model, dataset=test_all, settings=es)
    assert losses[-1] < 0.7 * losses[0]
    assert last.loss < first.loss
    assert last.map50 > first.map50 + 0.3 and last.map50 > 0.5, (first.map50, last.map50)
    # The server's global mAP (merged per-client statistics) is the centralised figure, exactly.
    per_client = [frcnn.fedplug_evaluate(model=model, dataset=t, settings=es) for t in tests]
    merged = metrics.summarize(per_client[0].stats.merge(per_client[1].stats))
    assert merged["map50"] == pytest.approx(last.map50, abs=1e-12)
    assert merged["recall"] == pytest.approx(last.recall, abs=1e-12)
    assert merged["coco_map"] == pytest.approx(last.metrics["coco_map"], abs=1e-12)
