"""The no-op detector's model: a torchvision detector's state dict, randomly initialised, nothing downloaded.

Kept apart from the plugin module so that Flower's side of ``bench_transport.py --peer flower`` builds the
very same payload in an interpreter where fedplug is not installed.
"""

from __future__ import annotations

import torch

BUILDERS = {
    "resnet50_fpn": "fasterrcnn_resnet50_fpn",
    "mobilenet_v3_large_fpn": "fasterrcnn_mobilenet_v3_large_fpn",
}


def _toy(num_classes: int) -> torch.nn.Module:
    """A 0.3 M-value stand-in with a detector's kinds of tensors (conv, BatchNorm, head), for the script's tests."""
    from torch import nn

    return nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 128, 3), nn.BatchNorm2d(128),
                         nn.Flatten(), nn.Linear(128, 2048), nn.Linear(2048, num_classes * 5))


def build(backbone: str, num_classes: int, seed: int = 0) -> torch.nn.Module:
    import torchvision.models.detection as detection

    if backbone not in (*BUILDERS, "toy"):
        raise ValueError(f"model.backbone must be one of {', '.join(BUILDERS)} or toy for bench_noop, "
                         f"got {backbone!r}")
    with torch.device("meta"):  # the architecture only: torchvision's own init takes ~15 s for R50 on a busy CPU
        model = _toy(num_classes) if backbone == "toy" else \
            getattr(detection, BUILDERS[backbone])(weights=None, weights_backbone=None, num_classes=num_classes)
    model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                t.zero_()
            elif name.endswith("running_var"):
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=g)
    return model
