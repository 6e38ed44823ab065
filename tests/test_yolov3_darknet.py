"""YOLOv3 plugin: reading Darknet ``.weights`` files.

Every file here is written by the test from a model's own tensors, in
Darknet's order, by an independent writer (``write_darknet`` below, not the
plugin's ``save_darknet_weights``), so a loader that reads the wrong order or
the wrong header fails.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from fedplug_plugins.detectors.yolov3.darknet_weights import (
    DarknetWeightsError,
    load_darknet_weights,
    read_header,
    save_darknet_weights,
)
from fedplug_plugins.detectors.yolov3.model import build_yolov3

torch.set_num_threads(1)


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter and BatchNorm statistic a distinct random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + (0.5 if "running_var" in name else -0.5))
    return model


def write_darknet(path, model, header=(0, 2, 0), seen=12345, cutoff=None) -> int:
    """Darknet's save_weights, written out longhand: per conv, BN beta/gamma/mean/var or bias, then weights."""
    major, minor, revision = header
    values = []
    for layer, conv, bn, _ in model.darknet_convs():
        if cutoff is not None and layer >= cutoff:
            continue
        if bn is not None:
            values += [bn.bias, bn.weight, bn.running_mean, bn.running_var]
        else:
            values.append(conv.bias)
        values.append(conv.weight)
    flat = np.concatenate([v.detach().numpy().ravel() for v in values]).astype("<f4")
    with open(path, "wb") as f:
        f.write(struct.pack("<3i", major, minor, revision))
        wide = major * 10 + minor >= 2 and major < 1000 and minor < 1000
        f.write(struct.pack("<q" if wide else "<i", seen))
        f.write(flat.tobytes())
    return flat.size


def same_weights(a, b, prefix=""):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith(prefix) and "num_batches" not in k)


@pytest.mark.parametrize("variant,k", [("nano", 3), ("tiny", 5)])
@pytest.mark.parametrize("header", [(0, 2, 0), (0, 1, 0)])  # seen as int64, and the old int32
def test_round_trip_restores_every_tensor_exactly(tmp_path, variant, k, header):
    source = randomise(build_yolov3({"variant": variant, "img_size": 64 if variant == "tiny" else 128}, k), 1)
    path = tmp_path / "model.weights"
    n = write_darknet(path, source, header=header)
    target = build_yolov3({"variant": variant, "img_size": 64 if variant == "tiny" else 128, "seed": 9}, k)
    assert not same_weights(source, target)
    report = load_darknet_weights(target, path)
    assert report.values_read == n == report.values_in_file
    assert report.header.seen == 12345 and (report.header.major, report.header.minor) == header[:2]
    assert same_weights(source, target)


def test_plugin_writer_matches_the_independent_writer(tmp_path):
    model = randomise(build_yolov3({}, 3), 2)
    write_darknet(tmp_path / "a.weights", model, seen=0)
    save_darknet_weights(model, tmp_path / "b.weights")
    assert (tmp_path / "a.weights").read_bytes() == (tmp_path / "b.weights").read_bytes()


def test_build_loads_the_configured_file(tmp_path):
    source = randomise(build_yolov3({}, 3), 3)
    write_darknet(tmp_path / "nano.weights", source)
    built = build_yolov3({"weights": str(tmp_path / "nano.weights")}, 3)
    assert same_weights(source, built)


def test_backbone_cutoff_from_the_file_name_like_darknet53_conv_74(tmp_path):
    """darknet53.conv.74 holds the 52 backbone convs; loading it leaves the neck and heads alone."""
    source = randomise(build_yolov3({"variant": "tiny", "img_size": 64}, 2), 4)
    path = tmp_path / "yolov3-tiny.conv.15"
    write_darknet(path, source, cutoff=15)
    target = build_yolov3({"variant": "tiny", "img_size": 64, "seed": 1}, 2)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_darknet_weights(target, path)
    assert report.cutoff == 15 and report.convs_loaded == 9
    assert same_weights(source, target, "body.backbone") and same_weights(source, target, "body.neck")
    sd = target.state_dict()
    for name in ("body.lateral.conv.weight", "body.head_fine.conv.weight", "body.out_fine.bias", "body.out_coarse.bias"):
        assert torch.equal(sd[name], fresh[name])  # layers >= 15: untouched


def test_explicit_cutoff_loads_a_prefix_of_a_full_file(tmp_path):
    source = randomise(build_yolov3({}, 3), 5)
    write_darknet(tmp_path / "full.weights", source)
    target = build_yolov3({"seed": 1}, 3)
    out_before = target.body.out_coarse.weight.clone()
    report = load_darknet_weights(target, tmp_path / "full.weights", cutoff=11)  # nano's backbone: layers 0-10
    assert report.convs_loaded == 6
    assert same_weights(source, target, "body.backbone")
    assert torch.equal(target.body.out_coarse.weight, out_before)


def test_reinit_heads_loads_a_file_with_another_class_count(tmp_path):
    source = randomise(build_yolov3({"variant": "tiny", "img_size": 64}, 80), 6)  # a "COCO" file
    write_darknet(tmp_path / "coco.weights", source)
    target = build_yolov3({"variant": "tiny", "img_size": 64, "seed": 1}, 7)
    fresh_out = target.body.out_fine.weight.clone()
    with pytest.raises(DarknetWeightsError, match="weights_reinit_heads"):
        load_darknet_weights(target, tmp_path / "coco.weights")
    report = load_darknet_weights(target, tmp_path / "coco.weights", reinit_heads=True)
    assert report.file_num_classes == 80 and report.heads_reinitialised == 2
    assert same_weights(source, target, "body.backbone") and same_weights(source, target, "body.head_fine")
    assert torch.equal(target.body.out_fine.weight, fresh_out)


def test_truncated_file_is_a_clear_error_and_leaves_the_model_untouched(tmp_path):
    source = randomise(build_yolov3({}, 3), 7)
    path = tmp_path / "cut.weights"
    write_darknet(path, source)
    data = path.read_bytes()
    path.write_bytes(data[: 20 + 4 * ((len(data) - 20) // 8)])  # half the values
    target = build_yolov3({"seed": 1}, 3)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(DarknetWeightsError, match=r"too short.*cfg layer \d+.*truncated"):
        load_darknet_weights(target, path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())
    path.write_bytes(data[:-3])  # cut inside the last value
    with pytest.raises(DarknetWeightsError, match="truncated"):
        load_darknet_weights(target, path)
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())


def test_file_for_another_architecture_is_a_clear_error(tmp_path):
    write_darknet(tmp_path / "tiny.weights", build_yolov3({"variant": "tiny", "img_size": 64}, 3))
    with pytest.raises(DarknetWeightsError, match="too short"):  # 4 classes need more values than 3
        load_darknet_weights(build_yolov3({"variant": "tiny", "img_size": 64}, 4), tmp_path / "tiny.weights")
    with pytest.raises(DarknetWeightsError, match="another architecture or class count"):
        load_darknet_weights(build_yolov3({}, 3), tmp_path / "tiny.weights")


def test_missing_file_and_garbage_are_clear_errors(tmp_path):
    model = build_yolov3({}, 3)
    with pytest.raises(DarknetWeightsError, match="never downloads"):
        load_darknet_weights(model, tmp_path / "darknet53.conv.74")
    with pytest.raises(DarknetWeightsError, match="never downloads"):
        build_yolov3({"weights": str(tmp_path / "nope.weights")}, 3)
    (tmp_path / "short").write_bytes(b"\x00" * 10)
    with pytest.raises(DarknetWeightsError, match="not a Darknet"):
        load_darknet_weights(model, tmp_path / "short")
    (tmp_path / "odd.weights").write_bytes(struct.pack("<3iq", 0, 2, 0, 0) + b"\x00" * 7)
    with pytest.raises(DarknetWeightsError, match="whole number of float32"):
        load_darknet_weights(model, tmp_path / "odd.weights")
    path = tmp_path / "nan.weights"
    write_darknet(path, model)
    raw = bytearray(path.read_bytes())
    raw[20:24] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(raw))
    with pytest.raises(DarknetWeightsError, match="non-finite"):
        load_darknet_weights(model, path)


def test_header_seen_width_follows_the_version(tmp_path):
    (tmp_path / "new").write_bytes(struct.pack("<3iq", 0, 2, 5, 2**40) + b"\x00" * 4)
    (tmp_path / "old").write_bytes(struct.pack("<3ii", 0, 1, 0, 77) + b"\x00" * 4)
    assert read_header(tmp_path / "new").seen == 2**40 and read_header(tmp_path / "new").nbytes == 20
    assert read_header(tmp_path / "old").seen == 77 and read_header(tmp_path / "old").nbytes == 16


def test_published_file_sizes_match_the_architecture():
    """The byte sizes of the published Darknet files follow from the layer shapes alone."""
    from fedplug_plugins.detectors.yolov3.darknet_weights import _conv_size

    def file_bytes(model, cutoff=None):
        return 20 + 4 * sum(_conv_size(c) for c in model.darknet_convs() if cutoff is None or c.layer < cutoff)

    full = build_yolov3({"variant": "darknet53"}, 80)
    assert file_bytes(full) == 248_007_048  # yolov3.weights
    assert file_bytes(full, 74) == 162_482_580  # darknet53.conv.74
    assert file_bytes(build_yolov3({"variant": "tiny"}, 80)) == 35_434_956  # yolov3-tiny.weights


# ----------------------------------------------------------------------------- files for another variant

DARKNET53_CONV_74_BYTES = 162_482_580  # the published darknet53.conv.74
YOLOV3_WEIGHTS_BYTES = 248_007_048  # the published yolov3.weights (80 classes)
YOLOV3_TINY_WEIGHTS_BYTES = 35_434_956  # the published yolov3-tiny.weights (80 classes)


def sparse_file(path, nbytes, header=(0, 2, 0)):
    """A Darknet header, then zeros up to ``nbytes`` (sparse on disk: the big published sizes cost nothing)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<3iq", *header, 0))
        f.truncate(nbytes)
    return path


def untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return lambda: all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("variant,img_size,layers", [("tiny", 64, 24), ("nano", 128, 22)])
def test_darknet53_conv_74_into_a_smaller_variant_is_refused_naming_the_fit(tmp_path, variant, img_size, layers):
    path = sparse_file(tmp_path / "darknet53.conv.74", DARKNET53_CONV_74_BYTES)
    model = build_yolov3({"variant": variant, "img_size": img_size}, 3)
    same = untouched(model)
    with pytest.raises(DarknetWeightsError) as err:
        load_darknet_weights(model, path)
    msg = str(err.value)
    assert f"cutoff 74 (from the file name" in msg and f"{variant} has {layers} cfg layers" in msg
    assert "fits darknet53 with cutoff 74 (darknet53.conv.74)" in msg
    assert f"the model is {variant}: set model.variant=darknet53 or use a file for {variant}" in msg
    assert same()


@pytest.mark.parametrize("variant,img_size", [("nano", 128), ("darknet53", 64)])
def test_tiny_conv_15_into_another_variant_is_refused_naming_the_fit(tmp_path, variant, img_size):
    """Both models have 15 cfg layers; their first 15 need other float counts than tiny's."""
    path = tmp_path / "yolov3-tiny.conv.15"
    write_darknet(path, randomise(build_yolov3({"variant": "tiny", "img_size": 64}, 3), 11), cutoff=15)
    model = build_yolov3({"variant": variant, "img_size": img_size}, 3)
    same = untouched(model)
    with pytest.raises(DarknetWeightsError) as err:
        load_darknet_weights(model, path)
    msg = str(err.value)
    assert "named as a cutoff file (*.conv.15)" in msg and "must hold exactly" in msg
    assert "fits tiny with cutoff 15 (yolov3-tiny.conv.15)" in msg
    assert f"set model.variant=tiny or use a file for {variant}" in msg
    assert same()
    if variant == "darknet53":  # the published darknet53.conv.74 size still loads into darknet53
        report = load_darknet_weights(model, sparse_file(tmp_path / "darknet53.conv.74", DARKNET53_CONV_74_BYTES))
        assert report.cutoff == 74 and report.convs_loaded == 52 and report.values_read == report.values_in_file
        assert torch.count_nonzero(model.body.backbone.stem.conv.weight) == 0  # the (zero) file was read
        assert torch.count_nonzero(model.body.block32.out.weight) > 0  # layers >= 74 untouched


def test_a_nano_cutoff_file_into_tiny_is_refused_naming_the_fit(tmp_path):
    path = tmp_path / "nano.conv.13"
    write_darknet(path, randomise(build_yolov3({}, 3), 12), cutoff=13)
    with pytest.raises(DarknetWeightsError, match=r"too short.*fits nano with cutoff 13; the model is tiny"):
        load_darknet_weights(build_yolov3({"variant": "tiny", "img_size": 64}, 3), path)


def test_a_cutoff_file_holding_more_than_its_name_says_is_refused(tmp_path):
    """A *.conv.N file must hold exactly the first N layers, even when it is a longer file of the same model."""
    source = randomise(build_yolov3({}, 3), 13)
    write_darknet(tmp_path / "nano.conv.11", source, cutoff=13)
    target = build_yolov3({"seed": 1}, 3)
    with pytest.raises(DarknetWeightsError, match=r"\*\.conv\.11.*fits nano with cutoff 13.*model.weights_cutoff=13"):
        load_darknet_weights(target, tmp_path / "nano.conv.11")
    write_darknet(tmp_path / "nano.conv.13", source, cutoff=13)  # the right name loads
    assert load_darknet_weights(target, tmp_path / "nano.conv.13").convs_loaded == 8
    assert same_weights(source, target, "body.backbone")


def test_a_cutoff_beyond_the_models_layers_is_refused(tmp_path):
    write_darknet(tmp_path / "nano.weights", build_yolov3({}, 3))
    with pytest.raises(DarknetWeightsError, match=r"cutoff 23 \(from model.weights_cutoff\).*22 cfg layers.*at most 22"):
        load_darknet_weights(build_yolov3({}, 3), tmp_path / "nano.weights", cutoff=23)
    assert load_darknet_weights(build_yolov3({}, 3), tmp_path / "nano.weights", cutoff=22).convs_loaded == 12


def test_an_explicit_cutoff_takes_a_prefix_of_this_variant_only(tmp_path):
    # the first layers of another variant's longer file: refused
    write_darknet(tmp_path / "tiny.weights", build_yolov3({"variant": "tiny", "img_size": 64}, 3))
    with pytest.raises(DarknetWeightsError, match=r"no nano file.*fits the whole tiny model with 3 classes"):
        load_darknet_weights(build_yolov3({}, 3), tmp_path / "tiny.weights", cutoff=11)
    # the backbone of this variant's file trained for another class count (yolov3.weights -> cutoff 74): loads
    source = randomise(build_yolov3({"variant": "tiny", "img_size": 64}, 80), 14)
    write_darknet(tmp_path / "coco.weights", source)
    target = build_yolov3({"variant": "tiny", "img_size": 64, "seed": 1}, 7)
    report = load_darknet_weights(target, tmp_path / "coco.weights", cutoff=15)
    assert report.convs_loaded == 9 and same_weights(source, target, "body.backbone")
    # ...but not its output layers, which have another class count
    with pytest.raises(DarknetWeightsError, match="no tiny file"):
        load_darknet_weights(target, tmp_path / "coco.weights", cutoff=16)


def test_a_full_file_must_match_exactly(tmp_path):
    path = tmp_path / "nano.weights"
    write_darknet(path, build_yolov3({}, 3))
    path.write_bytes(path.read_bytes() + b"\x00" * 28)  # 7 stray values
    with pytest.raises(DarknetWeightsError, match="another architecture.*fits none of the known variants"):
        load_darknet_weights(build_yolov3({}, 3), path)
    write_darknet(path, build_yolov3({}, 3))
    with pytest.raises(DarknetWeightsError, match="too short.*fits the whole nano model with 3 classes.*reinit_heads=true"):
        load_darknet_weights(build_yolov3({}, 4), path)  # a 3-class file into a 4-class model


def test_published_sizes_are_named():
    from fedplug_plugins.detectors.yolov3.darknet_weights import describe_file_size

    floats = lambda nbytes: (nbytes - 20) // 4  # noqa: E731
    assert "fits the whole darknet53 model with 80 classes (yolov3.weights)" in describe_file_size(
        floats(YOLOV3_WEIGHTS_BYTES))
    assert "fits the whole tiny model with 80 classes (yolov3-tiny.weights)" in describe_file_size(
        floats(YOLOV3_TINY_WEIGHTS_BYTES))
    assert describe_file_size(floats(DARKNET53_CONV_74_BYTES)).startswith(
        "this file fits darknet53 with cutoff 74 (darknet53.conv.74)")
