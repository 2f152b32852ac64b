"""/metrics: Prometheus text that scrapes, values that move with traffic, fold savings."""

from __future__ import annotations

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.settings import Settings


def scrape(api) -> dict[tuple[str, tuple], float]:
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def infer_json(api, model: str, x: np.ndarray, datatype: str = "FP32"):
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": datatype}]}
    body["inputs"][0]["data"] = x.reshape(-1).tolist()
    return api.post(f"/v2/models/{model}/infer", json=body)


def test_metrics_move_with_requests_and_failures(api):
    name = "resnet_small"
    spec = api.get(f"/v2/models/{name}").json()["inputs"][0]
    shape = [2 if d == -1 else d for d in spec["shape"]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    body = {"inputs": [{**spec, "shape": shape, "data": x.reshape(-1).tolist()}]}
    before = scrape(api)
    for _ in range(3):
        assert api.post(f"/v2/models/{name}/infer", json=body).status_code == 200
    bad = {"inputs": [{**spec, "shape": shape, "datatype": "INT32", "data": [0]}]}
    assert api.post(f"/v2/models/{name}/infer", json=bad).status_code == 400
    after = scrape(api)

    def moved(metric: str, **labels: str) -> float:
        return value(after, metric, **labels) - value(before, metric, **labels)

    assert moved("bnfold_infer_requests_total", model=name) == 4
    assert moved("bnfold_infer_failures_total", model=name, code="400") == 1
    for stage in ("queue", "compute", "request"):
        assert moved(f"bnfold_infer_{stage}_seconds_count", model=name) == 3
    assert moved("bnfold_infer_compute_seconds_sum", model=name) > 0
    assert moved("bnfold_batch_rows_sum", model=name) == 6  # 3 runs of 2 rows
    assert value(after, "bnfold_queue_depth", model=name) == 0
    provider = api.get(f"/v2/models/{name}").json()["execution_provider"]
    version = api.get(f"/v2/models/{name}").json()["versions"][0]
    info = {"model": name, "version": version, "execution_provider": provider}
    assert value(after, "bnfold_model_info", **info, dynamic_batching="true", precision="fp32") == 1


def test_metrics_report_what_folding_saved(api):
    samples = scrape(api)
    name = "resnet_small"
    record = api.get(f"/v1/models/{name}").json()
    counts = record["fold_report"]["counts"]
    assert value(samples, "bnfold_fold_batchnorm_removed", model=name) == counts["total"] > 0
    original = value(samples, "bnfold_graph_nodes", model=name, graph="original")
    folded = value(samples, "bnfold_graph_nodes", model=name, graph="folded")
    assert original - folded >= counts["total"] > 0
    assert record["savings"]["original_batchnorm"] == counts["total"]
    assert record["savings"]["folded_batchnorm"] == 0
    for graph in ("original", "folded"):
        assert value(samples, "bnfold_deploy_latency_seconds", model=name, graph=graph) > 0


def test_each_app_has_its_own_metrics_registry(tmp_path):
    first = create_app(Settings(store=tmp_path / "a"))
    second = create_app(Settings(store=tmp_path / "b"))  # the global registry would refuse
    assert first.state.metrics.registry is not second.state.metrics.registry
