"""bnfold.optimizer: `optimize`, the fastest verified artifact of a model on this machine.

One module per step: `source` (the model as given and its eval-mode reference), `bn_stats`
(BN statistics by tensor), `dfq` (the data-free math, arrays only), `equalize`, `ranges`,
`bias_correct`, `quantize` (onnxruntime's quantizer), `output_bias`, `mixed` (operators kept
in fp32 by measurement), `by_batch`, `accuracy`, `timing`, `choice`, `hardware`, `cuda` (the
fp16 candidate for target "cuda"), and `pipeline`, which runs them one stage function each.

Imported lazily, so that a step's own module (``accuracy``, say) loads without the pipeline's
torch and onnx-ir (9 s of imports on a 2-core AMD EPYC): the service's worker checks an
upload's labels with ``accuracy`` before it loads them.
"""

from importlib import import_module

_LAZY = {
    "Budget": "bnfold.optimizer.budget",
    "Candidate": "bnfold.optimizer.candidates",
    "OptimizeReport": "bnfold.optimizer.candidates",
    "OptimizeResult": "bnfold.optimizer.candidates",
    "optimize": "bnfold.optimizer.pipeline",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnfold.optimizer' has no attribute {name!r}")
