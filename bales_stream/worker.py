"""The worker: one consumer of the group. Read -> decode -> batch -> infer -> reply -> ack.

Two tasks run side by side so that reading overlaps with inference:

* the read loop XREADGROUPs new entries (only while the batcher has room), decodes them,
  answers malformed ones at once, and puts the rest into the batcher;
* the batch loop takes each ready batch (while an inference slot is free) and processes it:
  expired requests get an ``expired`` reply, the rest go through the model in one call in
  the executor, and every reply is written and its entry acked in one fenced step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from bales_producer import wire
from redis.exceptions import RedisError, ResponseError

from .batcher import Batcher
from .errors import RequestRejected, Unanswerable
from .inference import InferenceExecutor, predict_requests
from .metrics import Metrics
from .protocol import Limits, Request, decode_request, read_envelope
from .registry import ModelRegistry
from .replies import Completion, error_completion, ok_completion
from .settings import Settings
from .streams import StreamEntry, StreamStore

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
LOWER_PRIORITY_SHARE_DIVISOR = 8
"""Each read reserves 1/8 of its entries for every lower priority level (see streams)."""


@dataclass
class WorkerStatus:
    """What /health and /ready report."""

    models_loaded: bool = False
    group_joined: bool = False
    redis_ok: bool = False
    last_error: str | None = None
    stopping: bool = False

    @property
    def ready(self) -> bool:
        """Ready to take traffic: models loaded, group joined, Redis reachable."""
        return self.models_loaded and self.group_joined and self.redis_ok and not self.stopping


class Worker:
    """One consumer of the group; ``start()`` it, ``stop()`` it for a graceful drain."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = WorkerStatus()
        self.executor = InferenceExecutor(settings.thread_pool_size)
        self.registry = ModelRegistry(settings.weights_dir, self.executor.run)
        self.streams = StreamStore(
            redis,
            settings.keys,
            settings.consumer_group,
            settings.consumer_name,
            settings.reply_ttl_s,
        )
        self.batcher: Batcher[Request] = Batcher(
            settings.max_batch_size, settings.batch_window_ms, settings.priority_aging_ms
        )
        self.limits = Limits(round(settings.batcher_timeout_s * 1000), settings.max_input_bytes)
        # Larger reads under backlog pay (fewer round trips); the buffer bound keeps the
        # priority decision close to the model and the memory use small.
        self.read_count = 2 * settings.max_batch_size
        self.read_share = max(1, self.read_count // LOWER_PRIORITY_SHARE_DIVISOR)
        self.buffer_limit = 2 * settings.max_batch_size
        self._slots = asyncio.Semaphore(settings.thread_pool_size)
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._clock_offset_ms = 0.0

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models, join the group, and start the read and batch loops."""
        self.executor.start()
        await self.registry.load_default(self.settings.default_model_id)
        self.status.models_loaded = True
        await self._join_group()
        self._tasks = [
            asyncio.create_task(self._read_loop(), name="bales-read"),
            asyncio.create_task(self._batch_loop(), name="bales-batch"),
        ]

    async def stop(self) -> None:
        """Stop reading, answer everything already read, and ack it (within the grace)."""
        self.status.stopping = True
        self._stopping.set()
        reader, batch_loop = self._tasks or (None, None)
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_s):
                if reader is not None:
                    await reader
                await _cancel(batch_loop)
                for batch in self.batcher.take_all():
                    await self._slots.acquire()
                    self._spawn(self._process(batch))
                if self._in_flight:
                    await asyncio.gather(*self._in_flight, return_exceptions=True)
        except TimeoutError:
            log.warning(
                "shutdown grace of %s s ran out; unfinished entries stay pending",
                self.settings.shutdown_grace_s,
            )
            for task in [reader, batch_loop, *self._in_flight]:
                await _cancel(task)
        self.executor.stop()

    # ---- the read side ---------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff_s = BACKOFF_START_S
        own_pending_answered = False
        while not self._stopping.is_set():
            await self.batcher.wait_for_room(self.buffer_limit)
            try:
                if not own_pending_answered:
                    await self._answer_own_pending()
                    own_pending_answered = True
                entries = await self.streams.read(
                    self.read_count, self.read_share, self.settings.read_block_ms
                )
                await self._admit(entries)
            except RedisError as exc:
                await self._on_redis_error(exc, backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                continue
            backoff_s = BACKOFF_START_S
            self.status.redis_ok = True

    async def _answer_own_pending(self) -> None:
        """Entries delivered to this consumer name before a restart are answered first."""
        after: dict[int, str] = {}
        while entries := await self.streams.read_own_pending(after, self.read_count):
            log.info("answering %d entries left pending by an earlier run", len(entries))
            for entry in entries:
                after[entry.priority] = entry.entry_id
            await self._admit(entries)

    async def _admit(self, entries: list[StreamEntry]) -> None:
        """Decode entries: good ones go to the batcher, bad ones are answered at once."""
        rejections: list[Completion] = []
        for entry in entries:
            try:
                envelope = read_envelope(
                    entry.entry_id, entry.fields, entry.priority, self.settings.keys
                )
            except Unanswerable as exc:
                await self._dead_letter(entry, exc.reason)
                continue
            try:
                request = decode_request(
                    envelope, entry.fields or {}, self.registry.spec, self.limits
                )
            except RequestRejected as exc:
                self._count(envelope.model_id, exc.code)
                rejections.append(error_completion(envelope, exc.code, exc.message))
                continue
            self.batcher.put(request)
        await self._complete(rejections)

    async def _dead_letter(self, entry: StreamEntry, reason: str) -> None:
        log.warning("dead-lettering entry %s of p%d: %s", entry.entry_id, entry.priority, reason)
        await self.streams.dead_letter(entry, reason)
        self.metrics.dead_letters.inc()

    # ---- the batch side --------------------------------------------------------------

    async def _batch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self.batcher.next_batch()
            except BaseException:
                self._slots.release()
                raise
            self._spawn(self._process(batch))

    async def _process(self, batch: list[Request]) -> None:
        """Answer one batch: expired ones without computing, the rest in one model call."""
        try:
            started_ms = self.redis_now_ms()
            live = [r for r in batch if r.deadline_ms > started_ms]
            completions = [_expired(r, started_ms) for r in batch if r.deadline_ms <= started_ms]
            if completions:
                self._count(batch[0].model_id, wire.ERROR_EXPIRED, len(completions))
            if live:
                completions += await self._infer(live, started_ms)
            await self._complete(completions)
        finally:
            self._slots.release()

    async def _infer(self, requests: list[Request], started_ms: float) -> list[Completion]:
        model_id = requests[0].model_id
        model = self.registry.get(model_id)
        try:
            if model is None:
                raise RuntimeError(f"model {model_id} is no longer served")
            results = await self.executor.run(predict_requests, model, requests)
        except Exception as exc:
            log.exception("batch of %d for %s failed", len(requests), model_id)
            self._count(model_id, wire.ERROR_INTERNAL, len(requests))
            message = f"the model failed on this request's batch: {type(exc).__name__}: {exc}"
            return [error_completion(r, wire.ERROR_INTERNAL, message) for r in requests]
        done_ms = self.redis_now_ms()
        self._count(model_id, wire.STATUS_OK, len(requests))
        self.metrics.batch_size.observe(len(requests))
        completions = []
        for request, result in zip(requests, results, strict=True):
            latency_ms = done_ms - request.enqueued_ms
            self.metrics.latency.labels(str(request.priority)).observe(latency_ms / 1000)
            completions.append(
                ok_completion(
                    request,
                    model_version=model.version,
                    result=result,
                    batch_size=len(requests),
                    queued_ms=started_ms - request.enqueued_ms,
                    latency_ms=latency_ms,
                )
            )
        return completions

    async def _complete(self, completions: list[Completion]) -> None:
        """Write replies and ack; retried on Redis errors (the script is idempotent)."""
        backoff_s = BACKOFF_START_S
        while completions:
            try:
                stale = await self.streams.complete(completions)
                break
            except RedisError as exc:
                await self._on_redis_error(exc, backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
        else:
            return
        if stale:
            log.warning("%d replies dropped: their entries are no longer ours", stale)
            self.metrics.stale_completions.inc(stale)

    # ---- helpers ---------------------------------------------------------------------

    async def _join_group(self) -> None:
        backoff_s = BACKOFF_START_S
        while True:
            try:
                await self.streams.ensure_groups()
                await self._sync_clock()
                break
            except RedisError as exc:
                await self._on_redis_error(exc, backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
        self.status.group_joined = self.status.redis_ok = True
        log.info(
            "joined group %s as %s on %s",
            self.settings.consumer_group,
            self.settings.consumer_name,
            ", ".join(self.settings.keys.streams),
        )

    async def _sync_clock(self) -> None:
        """Measure the offset of Redis's clock (entry IDs) from ours."""
        before_ms = time.time() * 1000
        redis_ms = await self.streams.redis_time_ms()
        after_ms = time.time() * 1000
        self._clock_offset_ms = redis_ms - (before_ms + after_ms) / 2

    def redis_now_ms(self) -> float:
        """Now, on Redis's clock (the clock of entry IDs), in ms since the epoch."""
        return time.time() * 1000 + self._clock_offset_ms

    async def _on_redis_error(self, exc: RedisError, backoff_s: float) -> None:
        self.metrics.redis_errors.inc()
        self.status.redis_ok = False
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("Redis error (%s); retrying in %.1f s", self.status.last_error, backoff_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(backoff_s):
                await self._stopping.wait()
        if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
            log.warning("consumer group vanished; recreating it")
            with contextlib.suppress(RedisError):
                await self.streams.ensure_groups()

    def _count(self, model_id: str, status: str, n: int = 1) -> None:
        # Only served model ids become label values: request fields must not grow the series.
        label = model_id if self.registry.get(model_id) else "_unknown"
        self.metrics.requests.labels(label, status).inc(n)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)


def _expired(request: Request, now_ms: float) -> Completion:
    late_ms = now_ms - request.deadline_ms
    message = (
        f"deadline passed {late_ms:.0f} ms before the request could be computed "
        f"(timeout_ms was {request.deadline_ms - request.enqueued_ms})"
    )
    return error_completion(request, wire.ERROR_EXPIRED, message)


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
