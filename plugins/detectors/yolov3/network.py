"""The YOLOv3 network bodies: image batch in, one raw prediction map per detection scale out.

Built by :class:`~.model.YOLOv3` (which adds letterboxing, the loss and
decoding around them).  Layers follow the Darknet cfg files
``yolov3.cfg`` / ``yolov3-tiny.cfg``: every convolution is conv (no bias) +
BatchNorm + LeakyReLU(0.1), except the 1x1 output convolution before each YOLO
layer, which is linear with a bias.

Each body lists its convolutions in Darknet's layer order through
:meth:`darknet_convs` -- ``(cfg layer index, conv, bn or None, is_output)`` --
which is the order a Darknet ``.weights`` file stores them in
(:mod:`.darknet_weights`); ``num_layers`` is the body's number of cfg sections.  The layer index counts every cfg section
(``[convolutional]``, ``[shortcut]``, ``[maxpool]``, ``[route]``,
``[upsample]``, ``[yolo]``), so a Darknet cutoff such as the 74 of
``darknet53.conv.74`` means the same here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class DarknetConv(NamedTuple):
    layer: int  # index of the [convolutional] section in the cfg file
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None
    is_output: bool  # the linear 1x1 conv feeding a [yolo] layer


class ConvBNLeaky(nn.Module):
    """Darknet's ``[convolutional] batch_normalize=1 activation=leaky``."""

    def __init__(self, c_in: int, c_out: int, k: int, stride: int = 1, bn_momentum: float = 0.1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2, bias=False)
        # Darknet normalises with (x - mean) / sqrt(var + .00001)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-5, momentum=bn_momentum)
        self.act = nn.LeakyReLU(0.1, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    """Darknet-53's residual unit: 1x1 halving, 3x3 restoring, ``[shortcut] from=-3``."""

    def __init__(self, c: int, bn_momentum: float):
        super().__init__()
        self.reduce = ConvBNLeaky(c, c // 2, 1, bn_momentum=bn_momentum)
        self.expand = ConvBNLeaky(c // 2, c, 3, bn_momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(self.reduce(x))


class _Convs:
    """Collects a body's convolutions in Darknet layer order while it is built."""

    def __init__(self) -> None:
        self.items: list[tuple[int, nn.Module, bool]] = []
        self.layer = 0  # the next cfg section's index

    def conv(self, module: nn.Module, is_output: bool = False) -> nn.Module:
        self.items.append((self.layer, module, is_output))
        self.layer += 1
        return module

    def skip(self, n: int = 1) -> None:
        """Sections without weights: shortcut, maxpool, route, upsample, yolo."""
        self.layer += n

    def listing(self) -> list[DarknetConv]:
        out = []
        for layer, m, is_output in self.items:
            if isinstance(m, ConvBNLeaky):
                out.append(DarknetConv(layer, m.conv, m.bn, False))
            else:
                out.append(DarknetConv(layer, m, None, is_output))
        return out


class Darknet53(nn.Module):
    """The Darknet-53 backbone (cfg layers 0-74): features at strides 8, 16 and 32."""

    STAGES = ((64, 1), (128, 2), (256, 8), (512, 8), (1024, 4))  # (width, residual units)

    def __init__(self, bn_momentum: float = 0.1, convs: _Convs | None = None):
        super().__init__()
        convs = convs if convs is not None else _Convs()
        self.stem = convs.conv(ConvBNLeaky(3, 32, 3, bn_momentum=bn_momentum))
        stages = []
        c_in = 32
        for width, units in self.STAGES:
            layers = [convs.conv(ConvBNLeaky(c_in, width, 3, 2, bn_momentum))]
            for _ in range(units):
                block = Residual(width, bn_momentum)
                convs.conv(block.reduce)
                convs.conv(block.expand)
                convs.skip()  # [shortcut]
                layers.append(block)
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats[2], feats[3], feats[4]


class _DetectionBlock(nn.Module):
    """The five alternating 1x1/3x3 convs of a YOLOv3 scale, then the 3x3 + linear 1x1 output."""

    def __init__(self, c_in: int, width: int, out_channels: int, bn_momentum: float, convs: _Convs):
        super().__init__()
        m = bn_momentum
        self.body = nn.Sequential(
            convs.conv(ConvBNLeaky(c_in, width, 1, bn_momentum=m)),
            convs.conv(ConvBNLeaky(width, width * 2, 3, bn_momentum=m)),
            convs.conv(ConvBNLeaky(width * 2, width, 1, bn_momentum=m)),
            convs.conv(ConvBNLeaky(width, width * 2, 3, bn_momentum=m)),
            convs.conv(ConvBNLeaky(width * 2, width, 1, bn_momentum=m)),
        )
        self.head = convs.conv(ConvBNLeaky(width, width * 2, 3, bn_momentum=m))
        self.out = convs.conv(nn.Conv2d(width * 2, out_channels, 1), is_output=True)
        convs.skip()  # [yolo]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        route = self.body(x)
        return route, self.out(self.head(route))


class YOLOv3Body(nn.Module):
    """``yolov3.cfg``: Darknet-53 + FPN-style neck, outputs at strides 32, 16, 8 (in that order)."""

    def __init__(self, num_anchors: tuple[int, int, int], num_classes: int, bn_momentum: float = 0.1):
        super().__init__()
        convs = _Convs()
        m = bn_momentum
        self.backbone = Darknet53(m, convs)  # cfg layers 0-74
        outs = [a * (5 + num_classes) for a in num_anchors]
        self.block32 = _DetectionBlock(1024, 512, outs[0], m, convs)
        convs.skip()  # [route] -4
        self.lateral16 = convs.conv(ConvBNLeaky(512, 256, 1, bn_momentum=m))
        convs.skip(2)  # [upsample], [route] -1, 61
        self.block16 = _DetectionBlock(256 + 512, 256, outs[1], m, convs)
        convs.skip()  # [route] -4
        self.lateral8 = convs.conv(ConvBNLeaky(256, 128, 1, bn_momentum=m))
        convs.skip(2)  # [upsample], [route] -1, 36
        self.block8 = _DetectionBlock(128 + 256, 128, outs[2], m, convs)
        self._convs = convs.listing()
        self.num_layers = convs.layer  # cfg sections: 107 (0-106), as in yolov3.cfg

    def darknet_convs(self) -> list[DarknetConv]:
        return list(self._convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3, c4, c5 = self.backbone(x)
        r32, p32 = self.block32(c5)
        x = F.interpolate(self.lateral16(r32), scale_factor=2.0, mode="nearest")
        r16, p16 = self.block16(torch.cat([x, c4], 1))
        x = F.interpolate(self.lateral8(r16), scale_factor=2.0, mode="nearest")
        _, p8 = self.block8(torch.cat([x, c3], 1))
        return [p32, p16, p8]


class _SamePadMaxPool(nn.Module):
    """Darknet's ``[maxpool] size=2 stride=1``: keeps the size; the window at the edge sees
    only the valid pixels (replicate padding gives the same maximum)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), mode="replicate"), 2, 1)


class TinyBody(nn.Module):
    """``yolov3-tiny.cfg`` and its narrower, shallower ``nano`` sibling: two output scales.

    ``widths`` are the backbone's 3x3 convs, each followed by a stride-2
    max-pool except the last (stride-1 max-pool); ``wide`` is the 3x3 conv
    after it (1024 in tiny); ``neck`` the 1x1 reduction (256); ``lateral`` the
    1x1 before upsampling (128).  The route to the fine scale taps the
    second-to-last backbone conv.  tiny: widths (16, 32, 64, 128, 256, 512) ->
    strides 32/16; nano: (16, 32, 64, 128, 256) -> strides 16/8.
    """

    def __init__(
        self,
        num_anchors: tuple[int, int],
        num_classes: int,
        widths: tuple[int, ...] = (16, 32, 64, 128, 256, 512),
        wide: int = 1024,
        neck: int = 256,
        lateral: int = 128,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        convs = _Convs()
        m = bn_momentum
        layers: list[nn.Module] = []
        c_in = 3
        self.route_index = 2 * (len(widths) - 2)  # position of the tapped conv in self.backbone
        for i, w in enumerate(widths):
            layers.append(convs.conv(ConvBNLeaky(c_in, w, 3, bn_momentum=m)))
            layers.append(nn.MaxPool2d(2, 2) if i < len(widths) - 1 else _SamePadMaxPool())
            convs.skip()  # [maxpool]
            c_in = w
        layers.append(convs.conv(ConvBNLeaky(c_in, wide, 3, bn_momentum=m)))
        self.backbone = nn.ModuleList(layers)
        outs = [a * (5 + num_classes) for a in num_anchors]
        self.neck = convs.conv(ConvBNLeaky(wide, neck, 1, bn_momentum=m))
        self.head_coarse = convs.conv(ConvBNLeaky(neck, neck * 2, 3, bn_momentum=m))
        self.out_coarse = convs.conv(nn.Conv2d(neck * 2, outs[0], 1), is_output=True)
        convs.skip(2)  # [yolo], [route] -4
        self.lateral = convs.conv(ConvBNLeaky(neck, lateral, 1, bn_momentum=m))
        convs.skip(2)  # [upsample], [route] -1, 8
        self.head_fine = convs.conv(ConvBNLeaky(lateral + widths[-2], neck, 3, bn_momentum=m))
        self.out_fine = convs.conv(nn.Conv2d(neck, outs[1], 1), is_output=True)
        convs.skip()  # [yolo]
        self._convs = convs.listing()
        self.num_layers = convs.layer  # cfg sections: 24 (0-23) in tiny, as in yolov3-tiny.cfg; 22 in nano

    def darknet_convs(self) -> list[DarknetConv]:
        return list(self._convs)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        route = x
        for i, layer in enumerate(self.backbone):
            x = layer(x)
            if i == self.route_index:
                route = x
        n = self.neck(x)
        p_coarse = self.out_coarse(self.head_coarse(n))
        up = F.interpolate(self.lateral(n), scale_factor=2.0, mode="nearest")
        p_fine = self.out_fine(self.head_fine(torch.cat([up, route], 1)))
        return [p_coarse, p_fine]


def build_body(variant: str, num_anchors: tuple[int, ...], num_classes: int, bn_momentum: float) -> nn.Module:
    """The body of a variant named in :data:`~.settings.VARIANTS`."""
    if variant == "darknet53":
        return YOLOv3Body(num_anchors, num_classes, bn_momentum)
    if variant == "tiny":
        return TinyBody(num_anchors, num_classes, bn_momentum=bn_momentum)
    if variant == "nano":
        return TinyBody(
            num_anchors, num_classes, widths=(16, 32, 64, 128, 256), wide=256, neck=128,
            lateral=64, bn_momentum=bn_momentum,
        )
    raise ValueError(f"unknown YOLOv3 variant {variant!r}")
