"""Trace context: with the ``otel`` extra (opentelemetry-api) installed, each batch runs in a
``bales.batch`` span linked to the W3C ``traceparent`` of every request in it, so a trace
started by a producer shows where its request was batched and computed. Without it, nothing
happens (and nothing is imported)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from .protocol import Request

try:
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanContext, TraceFlags
except ImportError:  # the optional extra is not installed
    trace = None  # type: ignore[assignment]


@contextlib.contextmanager
def batch_span(model_id: str, requests: Sequence[Request]) -> Iterator[Any]:
    """A span around one model call, linked to each request's trace (no-op without OTel)."""
    if trace is None:
        yield None
        return
    links = [Link(context) for r in requests if (context := span_context(r.traceparent))]
    tracer = trace.get_tracer("bales_stream")
    attributes: dict[str, str | int] = {
        "bales.model_id": model_id,
        "bales.batch_size": len(requests),
    }
    with tracer.start_as_current_span("bales.batch", links=links, attributes=attributes) as span:
        yield span


def span_context(traceparent: str | None) -> Any:
    """The remote SpanContext of a validated traceparent (None if there is none)."""
    if trace is None or traceparent is None:
        return None
    _, trace_id, span_id, flags = traceparent.split("-")
    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
    )
