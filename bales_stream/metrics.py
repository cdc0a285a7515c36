"""Prometheus metrics of one consumer (base units: seconds, counts; no request ids as labels)."""

from __future__ import annotations

import bisect
import itertools
import math
import threading
from collections.abc import Iterable, Iterator, Sequence

from bales_producer import wire
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .queues import QueueStats
from .shards import shard_label

UNKNOWN_LABEL = "_unknown"
"""The model label of requests naming no served model (request text never becomes a label)."""
RELOAD_OK, RELOAD_FAILED = "ok", "failed"
RELOAD_OUTCOMES = (RELOAD_OK, RELOAD_FAILED)

LATENCY_BUCKETS_S = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
STAGE_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)
"""Finer at the bottom than the latency buckets: most stages take well under a millisecond."""
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 128, 256)
STAGES = ("redis", "memory", "executor_queue", "model", "handback", "completion")
"""The stages of ``bales_stage_seconds``."""
TASK_KINDS = ("read", "batch", "lease", "reclaim", "trim", "control", "clock")
"""The kinds of supervised task (``bales_task_restarts_total{task}``; see ``supervisor``)."""


class BatchHistogram:
    """A Prometheus histogram observed a batch of values at a time: one lock and one
    ``bisect`` per value instead of ``prometheus_client``'s locked ``observe`` (the
    per-request histograms are on the event loop's hot path; numpy is not used here, as
    its calls may release the GIL to the inference threads mid-batch). Exposed like
    ``prometheus_client``'s own (``_bucket``, ``_count``, ``_sum``); a series appears
    with its first observation."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = [*buckets, math.inf]
        self._les = [floatToGoString(bound) for bound in self._bounds]
        self._series: dict[tuple[str, ...], list[float]] = {}
        """labels -> per-bucket counts (not cumulative), then the sum."""
        self._lock = threading.Lock()
        registry.register(self)

    def observe_many(self, values: Iterable[float], *labels: str) -> None:
        """Record every value of ``values`` (seconds, counts...) in the series ``labels``."""
        bounds, where = self._bounds, bisect.bisect_left  # first bound >= value: le
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [0.0] * (len(bounds) + 1)
            total = 0.0
            for value in values:
                series[where(bounds, value)] += 1
                total += value
            series[-1] += total

    def observe(self, value: float, *labels: str) -> None:
        """Record one value (for per-batch figures)."""
        self.observe_many((value,), *labels)

    def describe(self) -> list[HistogramMetricFamily]:
        """The family without samples (for the registry's name check)."""
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """The family with one histogram per series, buckets cumulative."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            copies = [(labels, list(series)) for labels, series in self._series.items()]
        for labels, series in copies:
            cumulative = list(itertools.accumulate(series[:-1]))
            family.add_metric(
                list(labels), list(zip(self._les, cumulative, strict=True)), series[-1]
            )
        yield family


class Metrics:
    """The service's metrics, in their own registry (several workers can share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # the process (CPU, memory, open files), Python (version) and garbage collector series
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "bales_requests",
            "Requests answered, by model and outcome (ok or an error code).",
            ["model_id", "status"],
            registry=self.registry,
        )
        self.latency = BatchHistogram(
            "bales_request_latency_seconds",
            "From enqueue (stream entry ID) to reply written, for computed requests.",
            ["priority"],
            LATENCY_BUCKETS_S,
            self.registry,
        )
        self.batch_size = Histogram(
            "bales_batch_size",
            "Requests per model call.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "bales_queue_depth",
            "Entries not yet delivered to the consumer group (XINFO GROUPS lag), by priority "
            "and shard (v1: the unsharded streams); no sample while Redis does not answer.",
            ["priority", "shard"],
            registry=self.registry,
        )
        self.pending = Gauge(
            "bales_pending",
            "Entries delivered to the group but not yet acked, by priority and shard.",
            ["priority", "shard"],
            registry=self.registry,
        )
        self.queue_wait = BatchHistogram(
            "bales_queue_wait_seconds",
            "From enqueue (stream entry ID) to the start of its batch, for computed requests.",
            ["priority"],
            LATENCY_BUCKETS_S,
            self.registry,
        )
        self.inference = BatchHistogram(
            "bales_inference_seconds",
            "Time of the model call that answered a request (its whole batch), per request.",
            ["priority"],
            LATENCY_BUCKETS_S,
            self.registry,
        )
        self.queue_length = Gauge(
            "bales_queue_length",
            "Entries in the request stream (XLEN: waiting, pending and answered-not-trimmed), "
            "by priority and shard.",
            ["priority", "shard"],
            registry=self.registry,
        )
        self.oldest_age = Gauge(
            "bales_queue_oldest_age_seconds",
            "Age of the oldest request not yet answered (0 when none waits), by priority and "
            "shard.",
            ["priority", "shard"],
            registry=self.registry,
        )
        self.group_consumers = Gauge(
            "bales_group_consumers",
            "Consumers the consumer group knows (largest over the streams this consumer "
            "serves); NaN while Redis does not answer.",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "bales_model_info",
            "Served models: 1 per model with the version it serves now.",
            ["model_id", "version"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "bales_reloads",
            "Model reloads on this consumer, by outcome (ok or failed).",
            ["model_id", "outcome"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "bales_dead_letters",
            "Entries moved to the dead-letter stream.",
            registry=self.registry,
        )
        self.stale_completions = Counter(
            "bales_stale_completions",
            "Replies dropped because the entry was no longer pending for this consumer.",
            registry=self.registry,
        )
        self.model_failures = Counter(
            "bales_model_failures",
            "Model calls that raised (the batch is then split to isolate the culprit).",
            registry=self.registry,
        )
        self.reclaimed = Counter(
            "bales_reclaimed",
            "Entries taken over from idle consumers (XAUTOCLAIM).",
            registry=self.registry,
        )
        self.task_restarts = Counter(
            "bales_task_restarts",
            "Long-lived tasks (read, batch, lease, reclaim, trim, control, clock) restarted "
            "after an unexpected exception.",
            ["task"],
            registry=self.registry,
        )
        self.undeliverable = Counter(
            "bales_undeliverable_replies",
            "Replies that could not be written because the reply key or the reply_to inbox "
            "holds another type (the entry is still acked).",
            ["key"],
            registry=self.registry,
        )
        self.future_entries = Counter(
            "bales_future_entries",
            "Entries whose ID was ahead of Redis's clock when read (enqueue time clamped).",
            registry=self.registry,
        )
        self.contained = Counter(
            "bales_contained_failures",
            "Unexpected exceptions on one entry, answered internal or dead-lettered.",
            registry=self.registry,
        )
        self.stage = BatchHistogram(
            "bales_stage_seconds",
            "Where a request's time goes, by stage: redis (enqueue to read), memory (read to "
            "its batch's start), executor_queue (batch start to a pool thread taking it), "
            "model (in the pool thread), handback (pool thread to the event loop), completion "
            "(the replies-and-ack round trip). redis and memory per request, the rest per hand-off "
            "(one or more batches).",
            ["stage"],
            STAGE_BUCKETS_S,
            self.registry,
        )
        for name in STAGES:  # present at 0 from the start, like the counters below
            self.stage.observe_many((), name)
        self.input_elements = Counter(
            "bales_input_elements",
            "Input values given to the model, by model and kind: real (the requests' own) or "
            "padding (added to batch variable lengths); waste = padding / real.",
            ["model_id", "kind"],
            registry=self.registry,
        )
        for kind in TASK_KINDS:  # present at 0 from the start, so increase() sees the first
            self.task_restarts.labels(kind)
        for key in ("reply", "inbox"):
            self.undeliverable.labels(key)
        self.redis_errors = Counter(
            "bales_redis_errors",
            "Redis commands that failed (connection lost, timeouts, server errors).",
            registry=self.registry,
        )

    def observe_requests(
        self,
        priorities: Sequence[int],
        *,
        latency_s: Sequence[float],
        queued_s: Sequence[float],
        inference_s: float,
        in_redis_s: Sequence[float],
        in_memory_s: Sequence[float],
    ) -> None:
        """Record the computed requests of one batch (in request order): latency, queue
        wait and inference time per priority, and the two waits of each (in Redis, then in
        memory before its batch started)."""
        for priority in set(priorities):
            mine = [i for i, p in enumerate(priorities) if p == priority]
            label = str(priority)
            self.latency.observe_many([latency_s[i] for i in mine], label)
            self.queue_wait.observe_many([queued_s[i] for i in mine], label)
            self.inference.observe_many([inference_s] * len(mine), label)
        self.stage.observe_many(in_redis_s, "redis")
        self.stage.observe_many(in_memory_s, "memory")

    def observe_stages(self, **seconds: float) -> None:
        """Record a batch's per-batch stages (``executor_queue``, ``model``, ``handback``,
        ``completion``), by name."""
        for name, value in seconds.items():
            self.stage.observe(max(0.0, value), name)

    def count(self, model_label: str, status: str, n: int = 1) -> None:
        """Count ``n`` answered requests (``model_label`` must be a served model or a fixed
        placeholder: request fields never become label values)."""
        self.requests.labels(model_label, status).inc(n)

    def observe_queues(self, stats: list[QueueStats]) -> None:
        """Set the queue gauges, one series per priority and shard this consumer serves (a
        fleet with ``SERVE_SHARDS`` partitions adds up without double counting:
        ``sum by (priority) (max by (priority, shard) (...))``)."""
        self.forget_queues()
        for stat in stats:
            labels = (str(stat.priority), shard_label(stat.shard))
            self.queue_depth.labels(*labels).set(stat.lag or 0)
            self.pending.labels(*labels).set(stat.pending)
            self.queue_length.labels(*labels).set(stat.length)
            self.oldest_age.labels(*labels).set(stat.oldest_age_s or 0.0)
        self.group_consumers.set(max((s.consumers for s in stats), default=0))

    def forget_queues(self) -> None:
        """No queue figures: Redis did not answer. The gauges export no sample (and the
        consumer count NaN) rather than their last values, so alerts see "unknown", not a
        frozen backlog."""
        for gauge in (self.queue_depth, self.pending, self.queue_length, self.oldest_age):
            gauge.clear()
        self.group_consumers.set(math.nan)

    def observe_models(self, versions: dict[str, str]) -> None:
        """Set the model info gauge to the served ``model_id -> version`` map."""
        self.model_info.clear()
        for model_id, version in versions.items():
            self.model_info.labels(model_id, version).set(1)
            self._zero_series(model_id)
        self._zero_series(UNKNOWN_LABEL)

    def _zero_series(self, model_label: str) -> None:
        """Every labelled series of a model, present at 0 from the start: ``increase()`` and
        ``rate()`` then see its first event (a series born at 1 reads as no change)."""
        for status in (wire.STATUS_OK, *wire.ERROR_CODES):
            self.requests.labels(model_label, status)
        for outcome in RELOAD_OUTCOMES:
            self.reloads.labels(model_label, outcome)
        if model_label != UNKNOWN_LABEL:
            for kind in ("real", "padding"):
                self.input_elements.labels(model_label, kind)

    def count_elements(self, model_id: str, real: int, padding: int) -> None:
        """Count a model call's input values: the requests' own, and the padding."""
        self.input_elements.labels(model_id, "real").inc(real)
        if padding:
            self.input_elements.labels(model_id, "padding").inc(padding)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)
