"""A small pre-activation ResNet (He et al., 2016, "Identity Mappings in Deep Residual Networks").

Every conv is preceded by BN -> ReLU instead of followed by it:

    out = conv3x3(ReLU(BN(conv3x3(ReLU(BN(x)))))) + shortcut(x)

and the net ends with BN -> ReLU -> pool -> Linear. Inside a block, BN2 follows conv1 directly
and folds backward as usual. BN1 and the final BN read the residual stream instead: their
producer is a residual add, or the stem conv whose output also feeds the identity path, and a
ReLU separates them from the conv they feed. They are the placement a folder has to recognise
and leave alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["PreActBlock", "PreActNet", "PreActNetConfig"]


@dataclass(frozen=True)
class PreActNetConfig:
    in_channels: int = 3
    stem_width: int = 16
    widths: tuple[int, ...] = (16, 32)  # one block each; every block after the first has stride 2
    num_classes: int = 10


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, C_in, H, W] -> [N, C_out, H / stride, W / stride]
        pre = self.relu(self.bn1(x))
        # as in the paper, a projection shortcut reads the pre-activated input
        identity = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + identity


class PreActNet(nn.Module):
    def __init__(self, config: PreActNetConfig) -> None:
        super().__init__()
        self.stem = nn.Conv2d(config.in_channels, config.stem_width, 3, padding=1, bias=False)
        blocks = []
        in_channels = config.stem_width
        for i, width in enumerate(config.widths):
            blocks.append(PreActBlock(in_channels, width, stride=1 if i == 0 else 2))
            in_channels = width
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))  # [N, widths[-1], H / 2^(blocks-1), W / 2^(blocks-1)]
        x = self.pool(self.relu(self.bn(x))).flatten(1)  # [N, widths[-1]]
        return self.fc(x)  # [N, num_classes]
