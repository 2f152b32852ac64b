"""Property tests of the fold arithmetic against the layers it replaces, in float64."""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bnfold.numerics import bn_scale_shift, fold_bn_into_consumer, fold_bn_into_producer


def _stats(c: int, seed: int, eps: float):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(c, generator=g, dtype=torch.float64)
    var = torch.rand(c, generator=g, dtype=torch.float64) * 3 + 1e-3
    gamma = torch.randn(c, generator=g, dtype=torch.float64)
    beta = torch.randn(c, generator=g, dtype=torch.float64)
    return mean, var, gamma, beta, eps


def _bn(x, mean, var, gamma, beta, eps):
    return F.batch_norm(x, mean, var, gamma, beta, training=False, eps=eps)


dims = st.sampled_from([1, 2, 3])
groups_st = st.sampled_from([1, 2, 3])
eps_st = st.sampled_from([1e-5, 1e-3, 0.1])


@settings(max_examples=40, deadline=None)
@given(dims, groups_st, st.integers(1, 3), st.integers(1, 3), st.booleans(), eps_st,
       st.integers(0, 10_000), st.booleans())  # fmt: skip
def test_fold_into_producer_matches_conv_then_bn(dim, groups, cin_g, cout_g, bias, eps, seed, tr):
    g = torch.Generator().manual_seed(seed)
    cin, cout = cin_g * groups, cout_g * groups
    conv = [F.conv1d, F.conv2d, F.conv3d][dim - 1]
    convt = [F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d][dim - 1]
    k = (3,) * dim
    x = torch.randn(2, cin, *([5] * dim), generator=g, dtype=torch.float64)
    if tr:
        w = torch.randn(cin, cout_g, *k, generator=g, dtype=torch.float64)
    else:
        w = torch.randn(cout, cin_g, *k, generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    stats = _stats(cout, seed, eps)
    op = convt if tr else conv
    expected = _bn(op(x, w, b, groups=groups), *stats)
    s, t = bn_scale_shift(*stats[:4], eps)
    w2, b2 = fold_bn_into_producer(w, b, s, t, groups=groups, transposed=tr)
    torch.testing.assert_close(op(x, w2, b2, groups=groups), expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 2]), groups_st, st.integers(1, 3), st.integers(1, 3), st.booleans(),
       eps_st, st.integers(0, 10_000))  # fmt: skip
def test_fold_into_consumer_matches_bn_then_unpadded_conv(
    dim, groups, cin_g, cout_g, bias, eps, seed
):
    g = torch.Generator().manual_seed(seed)
    cin, cout = cin_g * groups, cout_g * groups
    conv = [F.conv1d, F.conv2d][dim - 1]
    x = torch.randn(2, cin, *([6] * dim), generator=g, dtype=torch.float64)
    w = torch.randn(cout, cin_g, *([3] * dim), generator=g, dtype=torch.float64)
    b = torch.randn(cout, generator=g, dtype=torch.float64) if bias else None
    stats = _stats(cin, seed, eps)
    expected = conv(_bn(x, *stats), w, b, groups=groups)
    s, t = bn_scale_shift(*stats[:4], eps)
    w2, b2 = fold_bn_into_consumer(w, b, s, t, groups=groups)
    torch.testing.assert_close(conv(x, w2, b2, groups=groups), expected, rtol=1e-10, atol=1e-10)


def test_affine_false_is_identity_scale_and_shift():
    mean, var = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 0.25])
    s, t = bn_scale_shift(mean, var, None, None, 0.0)
    torch.testing.assert_close(s, torch.tensor([0.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(t, torch.tensor([-0.5, 4.0], dtype=torch.float64))


def test_fold_casts_back_to_weight_dtype():
    w = torch.randn(4, 3, dtype=torch.bfloat16)
    s, t = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    w2, b2 = fold_bn_into_producer(w, None, s, t)
    assert w2.dtype == b2.dtype == torch.bfloat16


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.sampled_from([(1, 1), (3, 3), (1, 3), (3, 1), (5, 5)]), min_size=1, max_size=4),
    st.sampled_from([1, 2]),
    st.sampled_from([1, 2]),
    st.booleans(),
    st.integers(0, 10_000),
)
def test_merged_kernel_equals_sum_of_aligned_branches(kernels, stride, dilation, identity, seed):
    from bnfold.numerics import merge_branch_kernels, merged_kernel_layout

    g = torch.Generator().manual_seed(seed)
    c = 4
    x = torch.randn(2, c, 9, 8, generator=g, dtype=torch.float64)
    pads = [tuple(dilation * (k - 1) // 2 for k in ks) for ks in kernels]
    branches, expected = [], 0
    for ks, p in zip(kernels, pads, strict=True):
        w = torch.randn(c, c, *ks, generator=g, dtype=torch.float64)
        b = torch.randn(c, generator=g, dtype=torch.float64)
        expected = expected + F.conv2d(x, w, b, stride, p, dilation)
        branches.append((w, b, None))
    if identity and stride == 1:
        s, t = torch.rand(c, dtype=torch.float64), torch.randn(c, dtype=torch.float64)
        expected = expected + x * s[:, None, None] + t[:, None, None]
        kernels, pads = [*kernels, (1, 1)], [*pads, (0, 0)]
        branches.append((None, t, s))
    layout = merged_kernel_layout(kernels, pads, pads, (dilation, dilation))
    w, b = merge_branch_kernels(layout, c, c, branches)
    padding = layout.pad_begin
    assert layout.pad_end == padding
    got = F.conv2d(x, w, b, stride, padding, dilation)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
