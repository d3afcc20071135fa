"""Exports metrics with the real OpenTelemetry Python SDK (OTLP/HTTP, protobuf, gzip).

Configured only through the SDK's standard environment variables
(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT, ..._HEADERS, ..._COMPRESSION, OTEL_SERVICE_NAME),
exactly as an MCP server author would. Two exports: the second is cumulative over the
first, as the SDK's default temporality makes it, so the service must store increases.
"""

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

reader = PeriodicExportingMetricReader(OTLPMetricExporter(), export_interval_millis=3_600_000)
provider = MeterProvider(metric_readers=[reader])
meter = provider.get_meter("mcp-metrics-sender-test")

duration = meter.create_histogram("mcp.server.operation.duration", unit="s")
calls = meter.create_counter("tool_calls", unit="1")
attributes = {"mcp.method.name": "tools/call", "gen_ai.tool.name": "forecast"}

for seconds in (0.05, 0.2, 0.2, 1.5):
    duration.record(seconds, attributes)
calls.add(3, {"tool": "forecast"})
assert reader.force_flush(10_000), "first export failed"

duration.record(0.3, attributes)
calls.add(2, {"tool": "forecast"})
assert reader.force_flush(10_000), "second export failed"
provider.shutdown()
print("exported")
