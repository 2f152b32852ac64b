"""A small ResNet (He et al., 2015) for 32x32 inputs, built from BasicBlocks.

    out = ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))

The shortcut is the identity when shapes match and a 1x1 conv + BN "downsample" when a stage
changes stride or width, so the net has BNs on both branches of a residual add.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from models.blocks import ConvBNAct

__all__ = ["BasicBlock", "ResNetSmall", "ResNetSmallConfig"]


@dataclass(frozen=True)
class ResNetSmallConfig:
    in_channels: int = 3
    stem_width: int = 16
    widths: tuple[int, ...] = (16, 32)  # one stage each; every stage after the first has stride 2
    num_classes: int = 10


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, C_in, H, W] -> [N, C_out, H / stride, W / stride]
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNetSmall(nn.Module):
    def __init__(self, config: ResNetSmallConfig) -> None:
        super().__init__()
        self.stem = ConvBNAct(config.in_channels, config.stem_width)
        blocks = []
        in_channels = config.stem_width
        for i, width in enumerate(config.widths):
            blocks.append(BasicBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))  # [N, widths[-1], H / 2^(stages-1), W / 2^(stages-1)]
        x = self.pool(x).flatten(1)  # [N, widths[-1]]
        return self.fc(x)  # [N, num_classes]
