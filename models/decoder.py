"""A DCGAN-style decoder (Radford et al., 2015): latent vector -> image.

    z [N, latent] -> Linear -> [N, C0, S, S] -> (ConvTranspose2d -> BN -> ReLU) x k
      -> Conv2d -> Tanh -> image [N, out_channels, S * 2^k, S * 2^k]

The first up-sampling layer is a grouped ConvTranspose2d with a bias, the later ones plain and
bias-free: a transposed conv keeps its output channels on weight dim 1, split per group, which
is where folding a BN into it most easily goes wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["Decoder", "DecoderConfig", "UpBlock"]


@dataclass(frozen=True)
class DecoderConfig:
    latent_dim: int = 16
    base_channels: int = 32
    base_size: int = 4
    # (out_channels, groups) of each up-sampling block; each doubles H and W
    up_blocks: tuple[tuple[int, int], ...] = ((32, 4), (16, 1))
    out_channels: int = 3


class UpBlock(nn.Sequential):
    """ConvTranspose2d(k=4, s=2, p=1) -> BN -> ReLU: [N, C_in, H, W] -> [N, C_out, 2H, 2W]."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, bias: bool) -> None:
        super().__init__(
            nn.ConvTranspose2d(
                in_channels, out_channels, 4, stride=2, padding=1, groups=groups, bias=bias
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class Decoder(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        c0, s0 = config.base_channels, config.base_size
        self.project = nn.Linear(config.latent_dim, c0 * s0 * s0)
        self.unflatten = nn.Unflatten(1, (c0, s0, s0))
        blocks = []
        in_channels = c0
        for i, (out_channels, groups) in enumerate(config.up_blocks):
            blocks.append(UpBlock(in_channels, out_channels, groups, bias=i == 0))
            in_channels = out_channels
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(in_channels, config.out_channels, 3, padding=1)
        self.tanh = nn.Tanh()

    def forward(self, z: Tensor) -> Tensor:
        x = self.unflatten(self.project(z))  # [N, latent] -> [N, C0, S, S]
        x = self.blocks(x)  # [N, C_k, S * 2^k, S * 2^k]
        return self.tanh(self.to_image(x))  # [N, out_channels, S * 2^k, S * 2^k]
