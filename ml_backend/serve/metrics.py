"""``/metrics`` in the Prometheus text format, through the official client, as operations teams scrape it.

Request counts and latencies are observed by a middleware; the prediction and webhook counters already kept
by the predictor and the webhook handler are read at scrape time by a custom collector, so no count is kept
twice. Each app gets its own ``CollectorRegistry`` (tests build many apps in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Known routes only: a label per arbitrary path would let any caller grow the registry without bound.
ROUTES = ("/", "/health", "/setup", "/predict", "/webhook", "/versions", "/metrics", "/report")


def route_label(path: str) -> str:
    return path if path in ROUTES else "other"


class _StatsCollector(Collector):
    def __init__(self, predict_stats: Callable[[], Any], webhook_stats: Callable[[], dict[str, Any]]) -> None:
        self._predict_stats, self._webhook_stats = predict_stats, webhook_stats

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._predict_stats()
        yield CounterMetricFamily("medebiaser_predict_tasks", "Tasks received by /predict", value=stats.tasks)
        yield CounterMetricFamily(
            "medebiaser_predict_failed_tasks", "Tasks answered without a prediction", value=stats.failed_tasks
        )
        seconds = CounterMetricFamily(
            "medebiaser_predict_stage_seconds", "Time /predict spent per stage", labels=["stage"]
        )
        for stage in ("total", "fetch", "model", "heatmaps"):
            seconds.add_metric([stage], float(getattr(stats, f"seconds_{stage}", 0.0)))
        yield seconds
        webhook_stats = self._webhook_stats()  # one snapshot per scrape
        webhook = CounterMetricFamily("medebiaser_webhook_events", "Webhook events by outcome", labels=["outcome"])
        numeric = {k: v for k, v in webhook_stats.items() if isinstance(v, int | float)}
        for outcome, count in sorted(numeric.items()):
            if outcome != "jobs_enqueued":
                webhook.add_metric([outcome], float(count))
        yield webhook
        skipped = CounterMetricFamily(
            "medebiaser_webhook_skipped_items", "Regions and fields skipped at the webhook, by reason", labels=["code"]
        )
        for code, count in sorted((webhook_stats.get("skip_reasons") or {}).items()):
            skipped.add_metric([str(code)], float(count))
        yield skipped
        yield CounterMetricFamily(
            "medebiaser_jobs_enqueued", "Training jobs enqueued by webhooks", value=numeric.get("jobs_enqueued", 0)
        )


class AppMetrics:
    def __init__(self, predict_stats: Callable[[], Any], webhook_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "medebiaser_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "medebiaser_http_request_seconds",
            "HTTP request latency by route",
            ["route"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 100),
        )
        self.errors = Counter(
            "medebiaser_http_errors",
            "HTTP answers with a 4xx or 5xx status",
            ["route", "class"],
            registry=self.registry,
        )
        self.registry.register(_StatsCollector(predict_stats, webhook_stats))

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(route, f"{status // 100}xx").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
