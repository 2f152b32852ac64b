"""Fold arithmetic on tensors only: no graphs, no modules.

In eval mode BatchNorm is a per-channel affine map

    y = s * x + t,   s = gamma / sqrt(running_var + eps),   t = beta - s * running_mean

so it merges into a neighbouring affine layer y = W x + b (W of shape [out, in, *kernel]):

* backward, into the producer (affine -> BN):  W' = s[out] * W,   b' = s * b + t
* forward, into the consumer (BN -> affine):   W' = W * s[in],    b' = b + sum_{in,k} W * t[in]

Every function computes in float64 and casts the result back to the dtype of the weight it
was given, so that a fold never loses precision to the order of operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "bn_scale_shift",
    "fold_bn_into_producer",
    "fold_bn_into_consumer",
    "channel_scale_for_features",
]


def bn_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Return (s, t) in float64 such that eval-mode BN(x) == s * x + t per channel.

    `weight`/`bias` may be None (affine=False): gamma = 1, beta = 0.
    """
    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    s = gamma / torch.sqrt(var + float(eps))
    t = beta - s * mean
    return s, t


def _per_out_channel_view(weight: Tensor, s: Tensor, groups: int, transposed: bool) -> Tensor:
    """Reshape a per-output-channel vector so it broadcasts against `weight`.

    A regular conv / linear weight is [out, in/groups, *k]: the output channel is dim 0.
    A transposed conv weight is [in, out/groups, *k]: output channel o = g * (out/groups) + j
    lives at (rows of group g, column j), which is not dim 1 of the weight as a whole when
    groups > 1. We view the weight as [groups, in/groups, out/groups, *k] to scale it.
    """
    k_dims = weight.dim() - 2
    if not transposed:
        return s.reshape(-1, *([1] * (weight.dim() - 1)))
    out_per_group = weight.shape[1]
    # [groups, 1, out/groups, 1...] then expanded per input row of the group
    s_grouped = s.reshape(groups, 1, out_per_group, *([1] * k_dims))
    in_per_group = weight.shape[0] // groups
    return s_grouped.expand(groups, in_per_group, out_per_group, *([1] * k_dims)).reshape(
        weight.shape[0], out_per_group, *([1] * k_dims)
    )


def fold_bn_into_producer(
    weight: Tensor,
    bias: Tensor | None,
    s: Tensor,
    t: Tensor,
    *,
    groups: int = 1,
    transposed: bool = False,
) -> tuple[Tensor, Tensor]:
    """Fold y = s * (W x + b) + t into W' x + b'. Returns (W', b') in weight's dtype.

    A missing bias counts as zeros. `transposed` marks a ConvTranspose weight.
    """
    dtype = weight.dtype
    w64 = weight.detach().to(torch.float64)
    b64 = torch.zeros_like(s) if bias is None else bias.detach().to(torch.float64)
    w_new = w64 * _per_out_channel_view(w64, s, groups, transposed)
    b_new = s * b64 + t
    return w_new.to(dtype), b_new.to(dtype)


def channel_scale_for_features(v: Tensor, block: int) -> Tensor:
    """Expand a per-channel vector to flattened features: channel c covers features
    [c * block, (c + 1) * block), as after flattening [N, C, *spatial] row-major."""
    return v.repeat_interleave(block)


def fold_bn_into_consumer(
    weight: Tensor,
    bias: Tensor | None,
    s: Tensor,
    t: Tensor,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Fold W (s * x + t) + b into W' x + b'. Returns (W', b') in weight's dtype.

    `weight` is [out, in/groups, *k] (Linear or non-transposed Conv); `s`, `t` have one entry
    per input feature/channel (`in`). Exact only when every input element the layer reads is
    a real BN output: callers must rule out zero padding (the padded zeros are not shifted).
    """
    dtype = weight.dtype
    w64 = weight.detach().to(torch.float64)
    out_ch, in_per_group = w64.shape[0], w64.shape[1]
    out_per_group = out_ch // groups
    k_dims = w64.dim() - 2
    # input channel seen by weight[o, i] is (o // out_per_group) * in_per_group + i
    s_g = s.reshape(groups, 1, in_per_group, *([1] * k_dims))
    t_g = t.reshape(groups, 1, in_per_group, *([1] * k_dims))
    w_g = w64.reshape(groups, out_per_group, in_per_group, *w64.shape[2:])
    w_new = (w_g * s_g).reshape(w64.shape)
    shift = (w_g * t_g).sum(dim=tuple(range(2, w_g.dim()))).reshape(out_ch)
    b64 = (
        torch.zeros(out_ch, dtype=torch.float64)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    return w_new.to(dtype), (b64 + shift).to(dtype)
