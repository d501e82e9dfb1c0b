"""The service's metrics through Ray's metrics, under the same names and labels.

Under Ray Serve Prometheus scrapes each node's Ray metrics export port, not a replica's
`/metrics`. `RayMetricsExport` is the `MetricsExport` of a replica's `ServiceMetrics`: every
collector is declared as the `ray.util.metrics` counter, gauge or histogram of the same name,
label names and buckets, and fed every update, so `glipv2_requests_total`,
`glipv2_engine_batch_size_bucket`, ... reach Prometheus from every replica.

Ray exposes them with a `ray_` prefix and its own labels (node, worker, session) added;
`docker/ray/prometheus.yml` strips the prefix while scraping, so the Grafana dashboard's
queries (which sum over replicas) read both modes unchanged. A histogram's `_sum` there is
Ray's estimate from bucket midpoints, its buckets and counts exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ray.util.metrics import Counter, Gauge, Histogram

from service.telemetry import MetricKind


class RayMetricsExport:
    """Each declared metric as a `ray.util.metrics` object, updated with its labels as tags."""

    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}

    def declare(self, kind: MetricKind, name: str, documentation: str,
                labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        tag_keys = tuple(labelnames)
        if kind == "counter":
            self._metrics[name] = Counter(name, documentation, tag_keys=tag_keys)
        elif kind == "gauge":
            self._metrics[name] = Gauge(name, documentation, tag_keys=tag_keys)
        else:
            self._metrics[name] = Histogram(name, documentation, boundaries=list(buckets),
                                            tag_keys=tag_keys)

    def update(self, name: str, labels: Mapping[str, str], value: float) -> None:
        metric = self._metrics[name]
        tags = dict(labels)
        value = float(value)  # Ray takes Python numbers only (not NumPy's)
        if isinstance(metric, Counter):
            if value > 0:  # Ray refuses 0; Prometheus counts it as nothing
                metric.inc(value, tags=tags)
        elif isinstance(metric, Gauge):
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
