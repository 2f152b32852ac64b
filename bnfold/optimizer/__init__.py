"""bnfold.optimizer: `optimize`, the fastest verified artifact of a model on this machine.

One module per step: `bn_stats` (BN statistics by tensor), `dfq` (the data-free math, arrays
only), `equalize`, `ranges`, `bias_correct`, `quantize` (onnxruntime's quantizer), `mixed`
(operators kept in fp32 by measurement), `accuracy`, `timing`, `hardware`, and `pipeline`
which runs them.
"""

from bnfold.optimizer.budget import Budget
from bnfold.optimizer.candidates import Candidate, OptimizeReport, OptimizeResult
from bnfold.optimizer.pipeline import optimize

__all__ = ["Budget", "Candidate", "OptimizeReport", "OptimizeResult", "optimize"]
