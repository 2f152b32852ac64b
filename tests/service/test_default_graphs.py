"""The shipped graphs of the default models are what a fresh build of the zoo computes."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import models
from service.default_graphs import shipped_graph


@pytest.mark.parametrize("name", models.DEFAULT_MODELS)
def test_shipped_default_graph_holds_the_shipped_weights_exactly(name):
    # exact on any machine: both are the bits of models/weights (`python -m models.train`
    # rewrites both); a stale graph fails here before any rounding comes into it
    initializers = [
        numpy_helper.to_array(t) for t in onnx.load(shipped_graph(name)).graph.initializer
    ]
    for key, value in models.build(name).state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # eval-mode BN does not read it; the export drops it
        array = value.numpy()
        assert any(a.shape == array.shape and np.array_equal(a, array) for a in initializers), (
            f"{key} of the shipped weights is not in the shipped graph of {name}"
        )


@pytest.mark.parametrize("name", models.DEFAULT_MODELS)
def test_shipped_default_graph_matches_a_fresh_build(name):
    path = shipped_graph(name)
    assert path is not None, f"run `python -m service.default_graphs` to ship {name}"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = models.build(name)
    for batch in (1, 3):
        inputs = models.example_inputs(name, batch=batch)
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=True)}
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            want = model(*inputs).numpy()
        # the same weights on both sides: only the two runtimes' float32 rounding differs
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_every_default_model_has_a_shipped_graph():
    assert all(shipped_graph(name) for name in models.DEFAULT_MODELS)
