"""bnfold: fold trained BatchNorm into affine layers, verify the result, export ONNX.

The ONNX entry points are imported lazily so that `import bnfold` stays light.
"""

from importlib import import_module

from bnfold.report import Action, BNEntry, FoldReport, OutputError, VerifyCase, VerifyReport

_LAZY = {
    # module names differ from the function names so that importing a submodule never
    # shadows the function of the same name on the package
    "fold": "bnfold.folding",
    "FoldResult": "bnfold.folding",
    "verify": "bnfold.verification",
    "recalibrate": "bnfold.recalibration",
    "drift_score": "bnfold.drift.torch_score",
    "export_onnx": "bnfold.onnx.export",
    "ExportMismatch": "bnfold.onnx.export",
    "fold_onnx": "bnfold.onnx.fold",
    "OnnxFoldResult": "bnfold.onnx.fold",
    "verify_onnx": "bnfold.onnx.verify",
    "optimize": "bnfold.optimizer",
    "Budget": "bnfold.optimizer",
    "OptimizeResult": "bnfold.optimizer",
}

__all__ = [
    "Action",
    "BNEntry",
    "FoldReport",
    "OutputError",
    "VerifyCase",
    "VerifyReport",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold' has no attribute {name!r}")
