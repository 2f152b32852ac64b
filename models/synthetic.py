"""Synthetic data for the zoo: skewed inputs and a fixed random teacher.

Inputs are standard normal noise z pushed through a per-channel affine distortion,

    x[:, c, ...] = z[:, c, ...] * scale[c] + offset[c],

with channel = dim 1 of the batched input (a feature for [N, F], a channel for [N, C, ...]).
The distortion is what makes trained BatchNorm statistics interesting: the first BN of a net
sees means far from 0 and variances far from 1, and the layers after it inherit some of that.

Targets come from a teacher that looks at the clean signal z only: a fixed random projection
of all inputs (flattened, concatenated) onto the flattened output, squashed by tanh. Students
have something learnable to fit, and nothing about the task depends on the student's weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["InputDistribution", "RandomTeacher", "sample_inputs"]


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare by
class InputDistribution:
    """One model input: x = z * scale[c] + offset[c] with z ~ N(0, 1)."""

    shape: tuple[int, ...]  # one sample, without the batch dim
    offset: Tensor  # [C]
    scale: Tensor  # [C]

    @classmethod
    def seeded(cls, shape: Sequence[int], generator: torch.Generator) -> InputDistribution:
        channels = shape[0]
        offset = torch.empty(channels).uniform_(-2.0, 2.0, generator=generator)
        scale = torch.empty(channels).uniform_(0.5, 3.0, generator=generator)
        return cls(tuple(shape), offset, scale)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Return (x, z): the distorted input the model sees and the clean signal behind it."""
        z = torch.randn(batch, *self.shape, generator=generator)
        channel_view = (1, -1) + (1,) * (len(self.shape) - 1)
        x = z * self.scale.view(channel_view) + self.offset.view(channel_view)
        return x, z


def sample_inputs(
    distributions: Sequence[InputDistribution], batch: int, generator: torch.Generator
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
    """Sample every input of a model: returns (xs, zs), one tensor per input in each."""
    pairs = [d.sample(batch, generator) for d in distributions]
    return tuple(x for x, _ in pairs), tuple(z for _, z in pairs)


class RandomTeacher:
    """Fixed random map from the clean inputs to a target of the student's output shape."""

    def __init__(
        self,
        input_shapes: Sequence[tuple[int, ...]],
        output_shape: tuple[int, ...],
        generator: torch.Generator,
    ) -> None:
        in_features = sum(math.prod(s) for s in input_shapes)
        out_features = math.prod(output_shape)
        self.output_shape = output_shape
        # scaled so that the pre-activation has unit variance and tanh stays out of saturation
        self.projection = torch.randn(in_features, out_features, generator=generator)
        self.projection /= math.sqrt(in_features)

    def __call__(self, zs: Sequence[Tensor]) -> Tensor:
        flat = torch.cat([z.flatten(1) for z in zs], dim=1)  # [N, in_features]
        target = torch.tanh(flat @ self.projection)  # [N, out_features]
        return target.view(-1, *self.output_shape)
