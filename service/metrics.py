"""Prometheus metrics of one app, in its own ``CollectorRegistry`` (tests build several apps).

Counted as they happen: infer requests and failures per model; latency split into the time a
request waited for its run (queue), the onnxruntime run that served it (compute) and the whole
request after its body arrived (total); rows per onnxruntime run.

Read from the loaded models at scrape time, so a deleted model leaves no stale series: queue
depth, the execution provider, and what folding saved, from the model's record (BatchNorm nodes
removed, node counts and the latency measured at deploy time, before and after folding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from service.runtime.registry import ModelRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# 50 us .. 10 s: an MLP answers in well under a millisecond, a queued CNN batch in seconds
_LATENCY_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2.5, 5, 10
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ModelSeries:
    """One model's labelled series of the per-request metrics."""

    requests: Any
    queue_seconds: Any
    compute_seconds: Any
    total_seconds: Any


class ServiceMetrics:
    def __init__(self, models: ModelRegistry) -> None:
        self._series: dict[str, ModelSeries] = {}
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bnfold_infer_requests", "Infer requests received, per model", ["model"], registry=r
        )
        self.failures = Counter(
            "bnfold_infer_failures",
            "Infer requests answered with an error, per model and HTTP status",
            ["model", "code"],
            registry=r,
        )
        self.queue_seconds = _histogram("queue", "waiting for the run that served it", r)
        self.compute_seconds = _histogram("compute", "in the onnxruntime run that served it", r)
        self.total_seconds = _histogram("request", "from a complete body to the encoded reply", r)
        self.batch_rows = Histogram(
            "bnfold_batch_rows",
            "Rows (batch size) of each onnxruntime run",
            ["model"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        r.register(_ModelCollector(models))

    def series(self, model: str) -> ModelSeries:
        """The model's series, looked up once: ``labels()`` takes a lock and builds a key on
        every call, a measurable share of a small model's request."""
        found = self._series.get(model)
        if found is None:
            found = self._series[model] = ModelSeries(
                self.requests.labels(model),
                self.queue_seconds.labels(model),
                self.compute_seconds.labels(model),
                self.total_seconds.labels(model),
            )
        return found

    def batch_observer(self, model: str) -> Callable[[int, float], None]:
        """What a model's batcher calls after each run."""
        rows = self.batch_rows.labels(model)
        return lambda n, _compute_s: rows.observe(n)

    def watch_drift(self, monitor: Any) -> None:
        """Export a ``service.drift.DriftMonitor``'s scores and counts, read at scrape time."""
        self.registry.register(_DriftCollector(monitor))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _histogram(stage: str, what: str, registry: CollectorRegistry) -> Histogram:
    return Histogram(
        f"bnfold_infer_{stage}_seconds",
        f"Infer request latency: {what}",
        ["model"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )


class _ModelCollector(Collector):
    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "bnfold_queue_depth", "Infer requests waiting for a run", labels=["model"]
        )
        info = GaugeMetricFamily(
            "bnfold_model_info",
            "A deployed model: version, execution provider, batching, precision (value 1)",
            labels=["model", "version", "execution_provider", "dynamic_batching", "precision"],
        )
        removed = GaugeMetricFamily(
            "bnfold_fold_batchnorm_removed", "BatchNorm nodes folding removed", labels=["model"]
        )
        kept = GaugeMetricFamily(
            "bnfold_fold_batchnorm_kept", "BatchNorm nodes folding had to keep", labels=["model"]
        )
        nodes = GaugeMetricFamily(
            "bnfold_graph_nodes",
            "Nodes in the graph before/after folding",
            labels=["model", "graph"],
        )
        latency = GaugeMetricFamily(
            "bnfold_deploy_latency_seconds",
            "Median latency measured at deploy time (CPU, one thread), before/after folding",
            labels=["model", "graph"],
        )
        for model in self.models.all():
            name = model.name
            depth.add_metric([name], model.batcher.depth)
            batching = str(model.batcher.policy.enabled).lower()
            info.add_metric(
                [name, model.version, model.runtime.provider, batching, model.precision], 1
            )
            counts = (model.record.get("fold_report") or {}).get("counts") or {}
            if counts:
                removed.add_metric([name], counts.get("total", 0) - counts.get("kept", 0))
                kept.add_metric([name], counts.get("kept", 0))
            savings = model.record.get("savings") or {}
            for graph in ("original", "folded"):
                if f"{graph}_nodes" in savings:
                    nodes.add_metric([name, graph], savings[f"{graph}_nodes"])
                if f"{graph}_latency_s" in savings:
                    latency.add_metric([name, graph], savings[f"{graph}_latency_s"])
        yield from (depth, info, removed, kept, nodes, latency)


class _DriftCollector(Collector):
    """Drift scores and sample counts, read from the monitor at scrape time."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        score = GaugeMetricFamily(
            "bnfold_input_drift_score",
            "Input drift of the model's last window: median over BN sites of the standardized "
            "W2 distance to the running statistics",
            labels=["model"],
        )
        samples = CounterMetricFamily(
            "bnfold_drift_samples", "Sampled rows run through the drift observer", labels=["model"]
        )
        dropped = CounterMetricFamily(
            "bnfold_drift_samples_dropped",
            "Sampled requests dropped because the drift monitor was busy",
            labels=["model"],
        )
        for name, value in sorted(self.monitor.scores().items()):
            score.add_metric([name], value)
        for name, value in sorted(dict(self.monitor.sampled).items()):
            samples.add_metric([name], value)
        for name, value in sorted(dict(self.monitor.dropped).items()):
            dropped.add_metric([name], value)
        yield from (score, samples, dropped)
