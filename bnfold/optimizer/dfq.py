"""The math of data-free quantization (Nagel et al. 2019), on arrays only; no graph here.

BN statistics. After a Conv -> BN fold, output channel c of the conv had, on the training
distribution, mean beta_c and standard deviation |gamma_c| (the BN output is gamma * x_hat +
beta with x_hat standardized). That is the range information a quantizer needs, with no data.

Cross-layer equalization. For Conv1 -> ReLU -> Conv2, ReLU(s x) = s ReLU(x) for s > 0, so
scaling output channel i of Conv1 by 1/s_i and input channel i of Conv2 by s_i changes
nothing in exact arithmetic. With r1_i = max |W1[i]| and r2_i = max |W2[:, i]|, the choice
s_i = sqrt(r1_i / r2_i) makes both ranges sqrt(r1_i r2_i): the channels' weight ranges are
equal across the pair, which is what per-tensor (and depthwise) weight quantization needs.

Bias correction. Quantizing weights W to W_q shifts a layer's expected output by
E[(W_q - W) x] = (W_q - W) E[x]; E[x] per input channel is known from the BN statistics
propagated to the layer's input, so subtracting it from the bias removes the shift.

Weights are quantized as onnxruntime does for per-channel int8 (symmetric, [-127, 127],
scale = max|w| / 127 per output channel), so the correction matches the weights it will get.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bias_shift", "equalization_scales", "quantize_weight_per_channel"]


def equalization_scales(r1: np.ndarray, r2: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """s_i = sqrt(r1_i / r2_i); 1 where either range is zero (a dead channel stays as it is)."""
    r1 = np.asarray(r1, np.float64)
    r2 = np.asarray(r2, np.float64)
    s = np.ones_like(r1)
    live = (r1 > eps) & (r2 > eps)
    s[live] = np.sqrt(r1[live] / r2[live])
    return s


def quantize_weight_per_channel(w: np.ndarray, axis: int = 0, qmax: int = 127) -> np.ndarray:
    """W after symmetric per-channel int8 quantization and back, in float64."""
    w = np.asarray(w, np.float64)
    moved = np.moveaxis(w, axis, 0)
    absmax = np.abs(moved.reshape(len(moved), -1)).max(axis=1)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    shape = (-1,) + (1,) * (moved.ndim - 1)
    q = np.clip(np.round(moved / scale.reshape(shape)), -qmax, qmax) * scale.reshape(shape)
    return np.moveaxis(q, 0, axis)


def bias_shift(
    w: np.ndarray, w_q: np.ndarray, input_mean: np.ndarray, groups: int = 1
) -> np.ndarray:
    """E[(W_q - W) x] per output channel of a conv weight [O, I/groups, *kernel].

    `input_mean` is E[x] per input channel (length I). Borders of padded convs see zeros
    where this assumes the mean; that is the usual approximation.
    """
    err = (
        (np.asarray(w_q, np.float64) - np.asarray(w, np.float64))
        .reshape(w.shape[0], w.shape[1], -1)
        .sum(axis=2)
    )  # [O, I/groups]
    mean = np.asarray(input_mean, np.float64).reshape(groups, w.shape[1])
    per_group = w.shape[0] // groups
    group_of = np.arange(w.shape[0]) // per_group
    return np.einsum("oi,oi->o", err, mean[group_of])
