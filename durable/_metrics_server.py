"""``durable worker --metrics-port``: the worker's OpenTelemetry metrics as a Prometheus
endpoint, through the official exporter (the ``metrics`` extra: opentelemetry-sdk,
opentelemetry-exporter-prometheus and its prometheus_client)."""

from __future__ import annotations

from engine.errors import ConfigurationError


def serve_prometheus(host: str, port: int) -> None:
    """Install a MeterProvider whose reader is exposed at http://host:port/metrics, served by
    prometheus_client's HTTP server on a thread of its own."""
    try:
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import start_http_server
    except ImportError as exc:
        raise ConfigurationError(
            f"--metrics-port needs the metrics extra ({exc.name} is missing): "
            "pip install 'durable[metrics]'"
        ) from exc
    reader = PrometheusMetricReader()
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise ConfigurationError(f"--metrics-port: cannot listen on {host}:{port}: {exc}") from exc
