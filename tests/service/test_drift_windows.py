"""``DriftWindows`` in-process: what the monitor's process does with the samples it gets."""

from __future__ import annotations

import numpy as np
import pytest

from service.drift.windows import DriftWindows, Sample, Unmonitorable
from service.settings import Settings

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    import onnx

    import bnfold
    from models import digits

    split = digits.load_split()
    path = tmp_path_factory.mktemp("windows") / "original.onnx"
    graph = bnfold.export_onnx(digits.build(), (split.test_x[:2],), dynamic_batch=True)
    onnx.save(graph, str(path))
    return str(path), split.test_x.numpy()


def _samples(path: str, x: np.ndarray, rows: int, version: str = "1") -> list[Sample]:
    return [Sample("digits", version, path, {"x": x[i : i + rows]}) for i in range(0, len(x), rows)]


def test_windows_score_like_the_library_and_keep_one_entry_a_request(original):
    import onnx

    import bnfold
    from bnfold.drift import DriftDetector, ObserverSession, SiteReference, observer_graph

    path, x = original
    windows = DriftWindows(Settings(drift_window=16, drift_keep_samples=8))
    changed = windows.observe(_samples(path, x[:24], rows=4))
    rows, result = changed["digits"]
    assert rows == 24
    # 6 entries of 4 rows; the oldest leave once the rest hold a full window: the last 16
    assert result.samples == 16 and result is windows.report("digits", "1", path)
    observer = observer_graph(onnx.load(path))
    detector = DriftDetector(
        [SiteReference(s.name, s.mean, s.var, s.eps) for s in observer.sites], 0.1, 16
    )
    session = ObserverSession(observer)
    pooled = {}
    for site, (mean, var, count) in session.moments({"x": x[8:24]}).items():
        pooled[site] = bnfold.drift.ChannelMoments.of(mean, var, count)
    assert result.score == pytest.approx(detector.score(pooled, 16).score, rel=1e-9)
    kept, count = windows.kept_samples("digits")
    assert count == 8 and np.array_equal(kept["x"], x[16:24])


def test_a_new_version_starts_a_new_window_and_forget_drops_it(original):
    path, x = original
    windows = DriftWindows(Settings(drift_window=8))
    windows.observe(_samples(path, x[:8], rows=8))
    assert windows.report("digits", "2", path).samples == 0  # a new version: empty
    windows.observe(_samples(path, x[:4], rows=4, version="2"))
    assert windows.report("digits", "2", path).samples == 4
    windows.forget("digits")
    assert windows.report("digits", "2", path).samples == 0


def test_unmonitorable_versions_say_why_and_a_bad_sample_is_skipped(original, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    path, x = original
    windows = DriftWindows(Settings())
    with pytest.raises(Unmonitorable, match="no original graph"):
        windows.report("gone", "1", str(tmp_path / "missing.onnx"))
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "plain",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        )
    )
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    with pytest.raises(Unmonitorable, match="no BatchNorm running statistics"):
        windows.report("plain", "1", str(tmp_path / "plain.onnx"))
    # a sample of the wrong shape is logged and skipped; the good one after it counts
    bad = Sample("digits", "1", path, {"x": np.zeros((1, 3, 8, 8), np.float32)})
    changed = windows.observe([bad, *_samples(path, x[:2], rows=2)])
    assert changed["digits"][0] == 2
