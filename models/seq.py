"""A 1-D CNN for sequences: (Conv1d -> BatchNorm1d -> ReLU) x k, global average pool, Linear.

Input is [N, C, L]. BatchNorm1d on a 3-D input normalises per channel over batch and length,
the case where a folder must scale conv weights of shape [out, in, k] rather than [out, in].
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["Conv1dBNReLU", "SequenceCNN", "SequenceCNNConfig"]


@dataclass(frozen=True)
class SequenceCNNConfig:
    in_channels: int = 8
    # (out_channels, kernel_size, stride) of each conv layer
    layers: tuple[tuple[int, int, int], ...] = ((16, 5, 1), (32, 3, 2), (32, 3, 1))
    num_classes: int = 4


class Conv1dBNReLU(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__(
            nn.Conv1d(
                in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False
            ),
            nn.BatchNorm1d(out_channels),
            nn.ReLU(),
        )


class SequenceCNN(nn.Module):
    def __init__(self, config: SequenceCNNConfig) -> None:
        super().__init__()
        layers = []
        in_channels = config.in_channels
        for out_channels, kernel_size, stride in config.layers:
            layers.append(Conv1dBNReLU(in_channels, out_channels, kernel_size, stride))
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(in_channels, config.num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # [N, C_in, L] -> [N, C_k, L / prod(strides)]
        x = self.pool(x).flatten(1)  # [N, C_k]
        return self.head(x)  # [N, num_classes]
