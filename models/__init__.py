"""A zoo of small networks with BatchNorm in every placement users meet, built by name.

Every model was trained briefly on synthetic data, so its BatchNorm statistics are real, and
its weights ship with the package, so a build is the same on every machine:

    import models
    model = models.build("resnet_small")  # trained, eval mode, float32, shipped weights
    (x,) = models.example_inputs("resnet_small", batch=4)

`python -m models.train` reruns the training and rewrites the shipped weights.
"""

from models.registry import (
    DEFAULT_MODELS,
    ModelSpec,
    UnknownModelError,
    build,
    clear_cache,
    example_inputs,
    fit_score,
    get_spec,
    input_shapes,
    names,
    train,
)
from models.shipped import MissingWeightsError

__all__ = [
    "DEFAULT_MODELS",
    "MissingWeightsError",
    "ModelSpec",
    "UnknownModelError",
    "build",
    "clear_cache",
    "example_inputs",
    "get_spec",
    "fit_score",
    "input_shapes",
    "names",
    "train",
]
