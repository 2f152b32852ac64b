import pytest
from optimize_graphs import small_cnn


@pytest.fixture
def fast_pipeline(monkeypatch):
    """Few timing rounds and evaluation batches: tests check logic, never speed."""
    from bnfold.optimizer import pipeline

    monkeypatch.setattr(pipeline, "TIMING_ROUNDS", 2)
    monkeypatch.setattr(pipeline, "SEARCH_ROUNDS", 2)
    monkeypatch.setattr(pipeline, "EVAL_BATCHES", 2)
    monkeypatch.setattr(pipeline, "LARGE_BATCH", 4)
    return pipeline


@pytest.fixture
def cnn():
    return small_cnn()
