"""A small MobileNet (Howard et al., 2017) built from depthwise-separable convolutions.

Each block is a depthwise 3x3 conv (groups = channels) -> BN -> ReLU6 followed by a pointwise
1x1 conv -> BN -> ReLU6, so the net has BNs after grouped convs with one channel per group.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from models.blocks import ConvBNAct

__all__ = ["DepthwiseSeparable", "MobileNetSmall", "MobileNetSmallConfig"]


@dataclass(frozen=True)
class MobileNetSmallConfig:
    in_channels: int = 3
    stem_width: int = 16
    # (out_channels, stride) of each depthwise-separable block
    blocks: tuple[tuple[int, int], ...] = ((32, 1), (64, 2), (64, 1))
    num_classes: int = 10


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            # depthwise: every channel convolved on its own, spatial size / stride
            ConvBNAct(in_channels, in_channels, 3, stride, groups=in_channels, activation=nn.ReLU6),
            # pointwise: mixes channels, [N, C_in, H, W] -> [N, C_out, H, W]
            ConvBNAct(in_channels, out_channels, 1, activation=nn.ReLU6),
        )


class MobileNetSmall(nn.Module):
    def __init__(self, config: MobileNetSmallConfig) -> None:
        super().__init__()
        self.stem = ConvBNAct(config.in_channels, config.stem_width, stride=2, activation=nn.ReLU6)
        blocks = []
        in_channels = config.stem_width
        for out_channels, stride in config.blocks:
            blocks.append(DepthwiseSeparable(in_channels, out_channels, stride))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # [N, stem_width, H / 2, W / 2]
        x = self.pool(self.blocks(x)).flatten(1)  # [N, blocks[-1].out_channels]
        return self.classifier(x)  # [N, num_classes]
