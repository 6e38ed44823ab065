"""Small convolutional backbones for detectors that must train on a couple of CPU cores.

Used by the ``frcnn`` plugin (``backbone: tiny``); any detector may reuse them.
A backbone here is an ``nn.Module`` mapping a normalised image batch
``[B, 3, H, W]`` to one feature map, with an ``out_channels`` attribute, which
is what torchvision's ``FasterRCNN`` expects of a single-level backbone.

Normalisation is GroupNorm, not BatchNorm: it has no running statistics, so
(1) a federated model has no buffers whose average over clients with different
data means nothing, (2) train-mode and eval-mode outputs are the same, and
(3) small local batches (2-4 images) do not make the statistics noisy.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def _groups(channels: int) -> int:
    # Up to 8 groups of at least 4 channels: GroupNorm's usual regime for narrow layers.
    for g in (8, 4, 2, 1):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


def conv_gn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.GroupNorm(_groups(cout), cout),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """Two 3×3 conv-GN layers with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.GroupNorm(_groups(channels), channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


class TinyBackbone(nn.Module):
    """A stride-8 conv net: three stride-2 stages, each followed by residual blocks.

    :param channels: output channels of the three stages; the last is
        ``out_channels``.
    :param blocks: residual blocks after each stage.

    With the defaults (16, 32, 64) and (0, 1, 1) the receptive field of one
    output cell is about 60 px, enough to see a whole 12-50 px object at
    128 px input, and one 128 px image costs about 40 MFLOPs.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (0, 1, 1)) -> None:
        super().__init__()
        if len(channels) != 3 or len(blocks) != 3 or min(channels) < 1 or min(blocks) < 0:
            raise ValueError(
                f"tiny backbone needs 3 stage widths >= 1 and 3 block counts >= 0, got {list(channels)}, {list(blocks)}"
            )
        layers: list[nn.Module] = []
        cin = 3
        for cout, n in zip(channels, blocks):
            layers.append(conv_gn_relu(cin, cout, stride=2))
            layers.extend(ResidualBlock(cout) for _ in range(n))
            cin = cout
        self.body = nn.Sequential(*layers)
        self.out_channels = int(channels[-1])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.body(x)
