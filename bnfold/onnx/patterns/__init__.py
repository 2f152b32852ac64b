"""ONNX fold patterns: one module per fold kind over `base.Pattern`, tried in this order."""

from bnfold.onnx.patterns.bn_consumer import BNConsumer
from bnfold.onnx.patterns.constant_bn import ConstantBN
from bnfold.onnx.patterns.producer_bn import ConvBN, GemmBN, MatMulBN

PRECOMPUTE = (ConstantBN(),)
BACKWARD = (ConvBN(), GemmBN(), MatMulBN())
FORWARD = (BNConsumer(),)

__all__ = ["BACKWARD", "FORWARD", "PRECOMPUTE"]
