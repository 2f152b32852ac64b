"""bnfold.optimizer: `optimize`, the fastest verified artifact of a model on this machine.

One module per step: `source` (the model as given and its eval-mode reference), `bn_stats`
(BN statistics by tensor), `dfq` (the data-free math, arrays only), `equalize`, `ranges`,
`bias_correct`, `quantize` (onnxruntime's quantizer), `output_bias`, `mixed` (operators kept
in fp32 by measurement), `by_batch`, `accuracy`, `timing`, `choice`, `hardware`, `cuda` (the
fp16 candidate for target "cuda"), and `pipeline`, which runs them one stage function each.
"""

from bnfold.optimizer.budget import Budget
from bnfold.optimizer.candidates import Candidate, OptimizeReport, OptimizeResult
from bnfold.optimizer.pipeline import optimize

__all__ = ["Budget", "Candidate", "OptimizeReport", "OptimizeResult", "optimize"]
