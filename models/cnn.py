"""A plain CNN: Conv-BN-ReLU stages with max pooling, global pooling and a Linear head.

Every BN directly follows its conv, the placement that always folds backward. The first conv
keeps its bias so that the fold of a biased conv is exercised too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from models.blocks import ConvBNAct

__all__ = ["SmallCNN", "SmallCNNConfig"]


@dataclass(frozen=True)
class SmallCNNConfig:
    in_channels: int = 3
    widths: tuple[int, ...] = (8, 16, 32)
    num_classes: int = 10


class SmallCNN(nn.Module):
    def __init__(self, config: SmallCNNConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = config.in_channels
        for i, width in enumerate(config.widths):
            if i > 0:
                layers.append(nn.MaxPool2d(2))  # halves H and W
            layers.append(ConvBNAct(in_channels, width, bias=i == 0))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, C, H, W] -> features [N, widths[-1], H / 2^(stages-1), W / 2^(stages-1)]
        x = self.pool(self.features(x)).flatten(1)  # [N, widths[-1]]
        return self.head(x)  # [N, num_classes]
