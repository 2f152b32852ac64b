"""A zoo of small networks with BatchNorm in every placement users meet, built by name.

Every model is trained briefly on synthetic data, so its BatchNorm statistics are real:

    import models
    model = models.build("resnet_small")  # trained, eval mode, float32, deterministic
    (x,) = models.example_inputs("resnet_small", batch=4)
"""

from models.registry import (
    DEFAULT_MODELS,
    ModelSpec,
    UnknownModelError,
    build,
    clear_cache,
    example_inputs,
    get_spec,
    input_shapes,
    names,
)

__all__ = [
    "DEFAULT_MODELS",
    "ModelSpec",
    "UnknownModelError",
    "build",
    "clear_cache",
    "example_inputs",
    "get_spec",
    "input_shapes",
    "names",
]
