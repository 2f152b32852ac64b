"""The shipped graphs of the default models are what a fresh build of the zoo computes."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import models
from service.default_graphs import shipped_graph


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
        # loose enough for another CPU's rounding in the short training run, tight enough to
        # catch a stale graph after a change to the zoo
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_every_default_model_has_a_shipped_graph():
    assert all(shipped_graph(name) for name in models.DEFAULT_MODELS)
