"""bnfold: fold trained BatchNorm into affine layers, verify the result, export ONNX."""

from bnfold.report import Action, BNEntry, FoldReport, OutputError, VerifyCase, VerifyReport

__all__ = ["Action", "BNEntry", "FoldReport", "OutputError", "VerifyCase", "VerifyReport"]
