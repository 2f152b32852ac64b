"""Multi-layer perceptrons with BatchNorm1d on either side of the activation.

* `bn_after_act`: Linear -> LeakyReLU -> BatchNorm1d. A nonlinearity sits between the BN and
  the Linear that produced its input, so the BN can only fold *forward*, into the next Linear.
* otherwise:      Linear -> BatchNorm1d -> LeakyReLU, the classic placement that folds
  backward into the Linear before it.

The last Linear is a plain head with no BN or activation after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["MLP", "MLPConfig"]


@dataclass(frozen=True)
class MLPConfig:
    sizes: tuple[int, ...] = (300, 200, 100, 50, 10)  # input, hidden..., output
    negative_slope: float = 0.01
    bn_after_act: bool = True


class LinearActBN(nn.Sequential):
    """Linear -> LeakyReLU -> BatchNorm1d."""

    def __init__(self, in_features: int, out_features: int, negative_slope: float) -> None:
        super().__init__(
            nn.Linear(in_features, out_features),
            nn.LeakyReLU(negative_slope),
            nn.BatchNorm1d(out_features),
        )


class LinearBNAct(nn.Sequential):
    """Linear -> BatchNorm1d -> LeakyReLU."""

    def __init__(self, in_features: int, out_features: int, negative_slope: float) -> None:
        super().__init__(
            nn.Linear(in_features, out_features),
            nn.BatchNorm1d(out_features),
            nn.LeakyReLU(negative_slope),
        )


class MLP(nn.Module):
    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        block = LinearActBN if config.bn_after_act else LinearBNAct
        sizes = config.sizes
        self.hidden = nn.Sequential(
            *(
                block(n_in, n_out, config.negative_slope)
                for n_in, n_out in zip(sizes[:-2], sizes[1:-1], strict=True)
            )
        )
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: Tensor) -> Tensor:
        # x: [N, sizes[0]] -> [N, sizes[-1]]
        return self.head(self.hidden(x))
