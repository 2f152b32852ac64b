"""Fixtures of the drift tests: the digits CNN (real data, shipped weights) and its export."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_model():
    from models import digits

    return digits.build()


@pytest.fixture(scope="session")
def digits_split():
    from models import digits

    return digits.load_split()


@pytest.fixture(scope="session")
def digits_onnx(digits_model, digits_split):
    import bnfold

    return bnfold.export_onnx(digits_model, (digits_split.test_x[:2],), dynamic_batch=True)
