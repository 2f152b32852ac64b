"""Building blocks shared by several zoo families."""

from __future__ import annotations

from torch import nn

__all__ = ["ConvBNAct"]


class ConvBNAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation, the unit most CNNs are stacked from.

    `padding` is kernel_size // 2, so a stride-1 block keeps the spatial size.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
        activation: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=kernel_size // 2,
                groups=groups,
                bias=bias,
            ),
            nn.BatchNorm2d(out_channels),
            activation(),
        )
