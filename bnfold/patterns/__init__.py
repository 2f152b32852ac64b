"""Fold patterns: each module is one way a BatchNorm call site merges into an affine layer.

A pattern returns `Folded` (what it merged into) or `Rejected` (a reason users can read);
it never raises for a model it cannot fold.
"""

from bnfold.patterns.base import FoldContext, Folded, Rejected
from bnfold.patterns.bn_consumer import fold_into_consumers
from bnfold.patterns.constant_bn import precompute_constant_bn
from bnfold.patterns.producer_bn import fold_into_producer

__all__ = [
    "FoldContext",
    "Folded",
    "Rejected",
    "fold_into_consumers",
    "fold_into_producer",
    "precompute_constant_bn",
]
