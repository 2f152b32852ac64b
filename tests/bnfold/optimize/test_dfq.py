import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.optimizer.dfq import bias_shift, equalization_scales, quantize_weight_per_channel


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), channels=st.integers(1, 8))
def test_equalization_scales_equalize_ranges(seed, channels):
    rng = np.random.default_rng(seed)
    r1, r2 = rng.uniform(0.01, 10, channels), rng.uniform(0.01, 10, channels)
    s = equalization_scales(r1, r2)
    np.testing.assert_allclose(r1 / s, r2 * s)  # both sqrt(r1 r2)


def test_equalization_scales_dead_channel_unchanged():
    assert equalization_scales(np.array([0.0, 4.0]), np.array([1.0, 1.0])).tolist() == [1.0, 2.0]


def test_quantize_weight_per_channel_matches_onnxruntime():
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import quantize_data

    w = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    ours = quantize_weight_per_channel(w)
    for o in range(4):
        zero, scale, q = quantize_data(w[o].reshape(-1), TensorProto.INT8, True)
        np.testing.assert_allclose(
            ours[o].reshape(-1), (q.astype(np.float64) - zero) * scale, rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_bias_shift_is_the_output_shift_for_constant_inputs(groups):
    rng = np.random.default_rng(groups)
    w = rng.standard_normal((6, 6 // groups, 3, 3))
    w_q = quantize_weight_per_channel(w)
    mean = rng.standard_normal(6)
    x = torch.from_numpy(np.broadcast_to(mean.reshape(1, 6, 1, 1), (1, 6, 5, 5)).copy())
    conv = torch.nn.functional.conv2d
    shift = conv(x, torch.from_numpy(w_q), groups=groups) - conv(
        x, torch.from_numpy(w), groups=groups
    )  # no padding: exact
    np.testing.assert_allclose(
        bias_shift(w, w_q, mean, groups), shift[0, :, 0, 0].numpy(), rtol=1e-9, atol=1e-12
    )
