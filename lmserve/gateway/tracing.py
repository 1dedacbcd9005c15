"""OpenTelemetry spans, only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

The opentelemetry packages (the `otel` extra) are imported only then, so a gateway without tracing
never loads them. Each proxied request gets one server span; its W3C `traceparent` is forwarded to
the backend so backend spans join the trace.
"""

from __future__ import annotations

import os
from typing import Any


class Tracer:
    """A thin wrapper over an OTel tracer provider with a batch OTLP/HTTP exporter."""

    def __init__(self, service_name: str = "lmserve-gateway") -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("lmserve.gateway")

    def start(self, name: str, attributes: dict[str, Any]) -> Any:
        from opentelemetry.trace import SpanKind

        return self.tracer.start_span(name, kind=SpanKind.SERVER, attributes=attributes)

    @staticmethod
    def traceparent(span: Any) -> bytes:
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}".encode()

    def shutdown(self) -> None:
        self.provider.shutdown()


def tracer_from_env(env: dict[str, str] | None = None) -> Tracer | None:
    values = os.environ if env is None else env
    if not values.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return None
    return Tracer(values.get("OTEL_SERVICE_NAME", "lmserve-gateway"))
