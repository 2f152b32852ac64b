"""Precompute: a BatchNorm whose input is a constant is itself a constant.

Weight standardization (timm's ScaledStdConv2d, NF-Nets) runs F.batch_norm(training=True)
over the conv *weight* on every forward pass. Its input depends on no model input, so its
output is computed once here and stored as a buffer, whatever mode the BN runs in. Running
statistics, if passed, are cloned and momentum set to 0, so computing the value changes no
buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bnfold.capture import BNSite, bn_arguments, constant_value, is_constant
from bnfold.patterns.base import FoldContext, Folded, Rejected

__all__ = ["precompute_constant_bn"]


def precompute_constant_bn(site: BNSite, ctx: FoldContext) -> Folded | Rejected:
    if site.node.op != "call_function":
        return Rejected("a BN module call is not precomputed")
    args = bn_arguments(site.node)
    values = {k: constant_value(v, ctx.gm, ctx.constants) for k, v in args.items()}
    if not all(is_constant(v) for v in values.values()):
        return Rejected("its input depends on the model inputs")
    stats = [
        None if values[k] is None else values[k].clone() for k in ("running_mean", "running_var")
    ]
    with torch.no_grad():
        value = F.batch_norm(
            values["input"], *stats, values["weight"], values["bias"],
            training=bool(values["training"]), momentum=0.0, eps=float(values["eps"]),
        )  # fmt: skip
    target = ctx.add_constant(value, site.node)
    return Folded([target], ["its input is a constant: its output was computed once"])
