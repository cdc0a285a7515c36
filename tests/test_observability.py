"""Structured logs, W3C trace context, and the batch span."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from bales_stream.logs import configure_logging
from bales_stream.protocol import Request, _traceparent
from bales_stream.tracing import batch_span

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_json_logs_carry_the_consumer_and_event_fields(capfd) -> None:
    configure_logging("info", "json", consumer="consumer-7")
    try:
        logging.getLogger("bales_stream.test").warning(
            "model %s raised", "m1", extra={"request_id": "r-1", "entry_id": "1-0"}
        )
        line = capfd.readouterr().err.strip().splitlines()[-1]
    finally:
        configure_logging("warning")
    record = json.loads(line)
    assert record["message"] == "model m1 raised"
    assert record["level"] == "WARNING" and record["logger"] == "bales_stream.test"
    assert (record["consumer"], record["request_id"], record["entry_id"]) == (
        "consumer-7",
        "r-1",
        "1-0",
    )
    stamped = datetime.fromisoformat(record["time"])  # ISO 8601, with its zone
    assert record["time"].endswith("Z") and stamped.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - stamped).total_seconds()) < 60


@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        (VALID, True),
        (VALID.upper(), False),  # W3C: lowercase hex only
        ("00-" + "0" * 32 + "-00f067aa0ba902b7-01", False),  # all-zero trace id
        ("ff" + VALID[2:], False),  # version ff is invalid
        (VALID[:-1], False),
        ("not a trace", False),
    ],
)
def test_only_a_valid_traceparent_is_kept(raw: str, kept: bool) -> None:
    assert _traceparent(raw.encode()) == (raw if kept else None)


def test_a_batch_span_links_to_every_request_trace() -> None:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    export = pytest.importorskip("opentelemetry.sdk.trace.export")
    in_memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    from opentelemetry import trace

    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    rows = np.zeros(128, dtype=np.float32)
    requests = [
        Request(0, "1-0", "a", "stub_v1", {"input": rows}, 0, 1, None, traceparent=VALID),
        Request(0, "1-1", "b", "stub_v1", {"input": rows}, 0, 1, None),
    ]
    with batch_span("stub_v1", requests):
        pass
    (span,) = exporter.get_finished_spans()
    assert span.name == "bales.batch"
    assert span.attributes["bales.batch_size"] == 2
    assert [format(link.context.trace_id, "032x") for link in span.links] == [VALID[3:35]]


async def test_a_producer_traceparent_reaches_the_consumers_batch_log(
    service, redis_url, prefix, caplog
) -> None:
    from bales_producer import AsyncClient

    caplog.set_level(logging.DEBUG, logger="bales_stream.worker")
    async with AsyncClient(redis_url, prefix=prefix) as client:
        reply = await client.infer("stub_v1", [0.5] * 128, traceparent=VALID, request_id="tp-1")
    assert reply["status"] == "ok"
    batches = [r for r in caplog.records if getattr(r, "batch_id", None) is not None]
    carrying = [r for r in batches if "tp-1" in r.request_ids]
    assert carrying and carrying[0].traceparents == [VALID]


async def test_latency_queue_wait_and_inference_are_recorded_per_priority(
    service, redis_url, prefix
) -> None:
    from bales_producer import AsyncClient

    async with AsyncClient(redis_url, prefix=prefix) as client:
        for priority in (0, 2, 2):
            await client.infer("stub_v1", [0.25] * 128, priority=priority)
    registry = service.worker.metrics.registry
    for name in ("request_latency", "queue_wait", "inference"):
        counts = [
            registry.get_sample_value(f"bales_{name}_seconds_count", {"priority": p})
            for p in ("0", "1", "2")
        ]
        assert counts == [1.0, None, 2.0], name
    wait_s = registry.get_sample_value("bales_queue_wait_seconds_sum", {"priority": "2"})
    total_s = registry.get_sample_value("bales_request_latency_seconds_sum", {"priority": "2"})
    assert 0 <= wait_s <= total_s


async def test_each_stage_of_a_request_is_timed(service, redis_url, prefix) -> None:
    from bales_producer import AsyncClient

    async with AsyncClient(redis_url, prefix=prefix) as client:
        replies = [await client.infer("stub_v1", [0.25] * 128) for _ in range(3)]
    registry = service.worker.metrics.registry

    def stage(name: str, kind: str) -> float:
        return registry.get_sample_value(f"bales_stage_seconds_{kind}", {"stage": name}) or 0

    assert stage("redis", "count") == stage("memory", "count") == 3  # per request
    for name in ("executor_queue", "model", "handback", "completion"):
        assert stage(name, "count") == 3, name  # per batch: one request each here
    # the parts fit in the whole: the stages before the reply took no longer than it did
    before_reply_s = sum(stage(n, "sum") for n in ("executor_queue", "model", "handback"))
    assert 0 < before_reply_s <= sum(r["latency_ms"] for r in replies) / 1000


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_batch_histogram_counts_as_a_prometheus_histogram_does(seed: int) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from bales_stream.metrics import LATENCY_BUCKETS_S, BatchHistogram

    rng = np.random.default_rng(seed)
    # values on every bucket bound (le is inclusive), between them, beyond the last, and 0
    values = np.concatenate(
        [np.array(LATENCY_BUCKETS_S), rng.exponential(0.05, 200), [0.0, 9.0, 1e9]]
    )
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("t_seconds", "t", ["priority"], LATENCY_BUCKETS_S, ours)
    reference = Histogram(
        "t_seconds", "t", ["priority"], buckets=LATENCY_BUCKETS_S, registry=theirs
    )
    for part in np.array_split(values, 7):
        batch.observe_many(part, "1")
    batch.observe(0.004, "1")
    for value in [*values, 0.004]:
        reference.labels("1").observe(value)

    def samples(registry: CollectorRegistry) -> dict[tuple, float]:
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in registry.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        }

    expected = samples(theirs)
    got = samples(ours)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key


def test_every_stage_is_exported_at_zero_before_any_request() -> None:
    from bales_stream.metrics import STAGES, Metrics

    registry = Metrics().registry
    for stage in STAGES:  # so rate() and increase() see the first observation
        assert registry.get_sample_value("bales_stage_seconds_count", {"stage": stage}) == 0
