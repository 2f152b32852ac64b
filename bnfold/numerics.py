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

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "bn_scale_shift",
    "apply_bn",
    "fold_bn_into_producer",
    "fold_bn_into_consumer",
    "channel_scale_for_features",
    "KernelLayout",
    "merged_kernel_layout",
    "merge_branch_kernels",
    "compose_linear",
    "branch_sum_macs",
    "compose_conv1x1_then_conv",
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


def apply_bn(x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Eval-mode BN of a tensor, s * x + t per channel on dim 1, computed in float64 and
    returned in x's dtype."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    y = x.detach().to(torch.float64) * s.view(view) + t.view(view)
    return y.to(x.dtype)


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


@dataclass(frozen=True)
class KernelLayout:
    """Where parallel conv branches sit inside one merged kernel (per spatial dim)."""

    size: tuple[int, ...]  # merged kernel size K
    pad_begin: tuple[int, ...]
    pad_end: tuple[int, ...]
    offsets: tuple[tuple[int, ...], ...]  # start of each branch's kernel inside K


def merged_kernel_layout(
    kernels: list[tuple[int, ...]],
    pads_begin: list[tuple[int, ...]],
    pads_end: list[tuple[int, ...]],
    dilation: tuple[int, ...],
) -> KernelLayout | str:
    """Lay branches (kernel k, paddings pb/pe, shared dilation d) into one kernel, or say why
    they do not line up.

    A branch reads input o*stride - pb + j*d (j < k). Inside a kernel of size K with leading
    padding P = max pb it reads the same positions from offset (P - pb) / d, which must be a
    whole number; every other entry of K is zero, so the extra zero padding it reads is
    multiplied by zero: exact. All branches must produce the same output size, i.e. have the
    same pb + pe - d(k - 1) in every dim. An identity / BN branch is a kernel of 1, padding 0.
    """
    dims = len(dilation)
    size, begin, end = [], [], []
    offsets = [[0] * dims for _ in kernels]
    for d in range(dims):
        totals = {pb[d] + pe[d] - dilation[d] * (k[d] - 1)
                  for k, pb, pe in zip(kernels, pads_begin, pads_end, strict=True)}  # fmt: skip
        if len(totals) != 1:
            return "the branches' paddings do not line up (their outputs would differ in size)"
        p = max(pb[d] for pb in pads_begin)
        k_max = 1
        for i, (k, pb) in enumerate(zip(kernels, pads_begin, strict=True)):
            offset, rem = divmod(p - pb[d], dilation[d])
            if rem:
                return "a branch's padding is not a whole number of dilation steps off the others"
            offsets[i][d] = offset
            k_max = max(k_max, offset + k[d])
        size.append(k_max)
        begin.append(p)
        end.append(totals.pop() + dilation[d] * (k_max - 1) - p)
    return KernelLayout(tuple(size), tuple(begin), tuple(end), tuple(map(tuple, offsets)))


def merge_branch_kernels(
    layout: KernelLayout,
    out_channels: int,
    in_per_group: int,
    branches: list[tuple[Tensor | None, Tensor | None, Tensor | None]],
) -> tuple[Tensor, Tensor]:
    """Sum parallel branches into one float64 kernel [out, in/groups, *K] and bias [out].

    Each branch is (weight, bias, scale), in the order of `layout.offsets`: a conv has its
    weight (and maybe a bias); an identity / BN branch has weight None, a per-channel `scale`
    s on the diagonal of each group (None for x itself: s = 1) and its shift t as the bias.
    """
    weight = torch.zeros(out_channels, in_per_group, *layout.size, dtype=torch.float64)
    bias = torch.zeros(out_channels, dtype=torch.float64)
    for (w, b, s), offset in zip(branches, layout.offsets, strict=True):
        if w is not None:
            window = tuple(slice(o, o + k) for o, k in zip(offset, w.shape[2:], strict=True))
            weight[(slice(None), slice(None), *window)] += w.detach().to(torch.float64)
        else:
            diag = torch.ones(out_channels, dtype=torch.float64) if s is None else s
            channels = torch.arange(out_channels)
            weight[(channels, channels % in_per_group, *offset)] += diag.to(torch.float64)
        if b is not None:
            bias += b.detach().to(torch.float64)
    return weight, bias


def compose_linear(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None
) -> tuple[Tensor, Tensor]:
    """y = W2 (W1 x + b1) + b2 as one affine map: (W2 W1, W2 b1 + b2), in float64.

    Weights are [out, in] (Linear / Gemm with transB=1 layout)."""
    w1, w2 = w1.detach().to(torch.float64), w2.detach().to(torch.float64)
    bias = torch.zeros(w2.shape[0], dtype=torch.float64)
    if b1 is not None:
        bias += w2 @ b1.detach().to(torch.float64)
    if b2 is not None:
        bias += b2.detach().to(torch.float64)
    return w2 @ w1, bias


def compose_conv1x1_then_conv(
    w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A 1x1 conv (W1 [m, i, 1...], b1) followed by a conv (W2 [o, m, *k], b2), both groups 1,
    as one conv: W[o, i, k] = sum_m W2[o, m, k] W1[m, i], b = b2 + sum_{m,k} W2[o, m, k] b1[m].

    Exact only where the second conv reads no zero padding, or b1 == 0: the composed conv
    pads x with zeros, which the 1x1 would have mapped to b1 (callers check)."""
    w1 = w1.detach().to(torch.float64).flatten(1)
    w2 = w2.detach().to(torch.float64)
    weight = torch.einsum("om...,mi->oi...", w2, w1)
    bias = torch.zeros(w2.shape[0], dtype=torch.float64)
    if b2 is not None:
        bias += b2.detach().to(torch.float64)
    if b1 is not None:
        bias += torch.einsum("om...,m->o", w2, b1.detach().to(torch.float64))
    return weight, bias


def branch_sum_macs(
    kernels: list[tuple[int, ...] | None], scaled: list[bool], in_per_group: int, out_ch: int
) -> int:
    """Multiply-adds per output position of a sum of parallel branches: a conv branch (its
    kernel size) costs prod(k) * in/groups * out, a BN branch (scaled) one per channel, and
    each add one per channel. An identity branch (kernel None, not scaled) costs only its add."""
    total = (len(kernels) - 1) * out_ch
    for kernel, has_scale in zip(kernels, scaled, strict=True):
        if kernel is not None:
            total += math.prod(kernel) * in_per_group * out_ch
        elif has_scale:
            total += out_ch
    return total
