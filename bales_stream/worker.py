"""The worker: one consumer of the group. Read -> decode -> batch -> infer -> reply -> ack.

Two tasks run side by side so that reading overlaps with inference:

* the read loop XREADGROUPs new entries (only while the batcher has room), decodes them,
  answers malformed ones at once, and puts the rest into the batcher;
* the batch loop takes each ready batch (while an inference slot is free) and hands it to
  the ``BatchProcessor``; every reply is then written and its entry acked in one fenced step.

Every entry read stays "held" (leased, see ``recovery``) until it is answered, so nothing a
live worker holds is reclaimed by another, and nothing a dead worker held is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from bales_producer import wire
from redis.exceptions import RedisError, ResponseError

from .batcher import Batcher
from .control import FleetControl
from .errors import RequestRejected, Unanswerable
from .inference import InferenceExecutor
from .metrics import Metrics
from .model_config import load_models_file
from .processing import BatchProcessor
from .protocol import Limits, Request, decode_request, read_envelope
from .recovery import Recovery
from .registry import ModelRegistry
from .replies import Completion, error_completion, expired_completion
from .settings import Settings
from .shards import Held, ShardedStreams
from .streams import StreamEntry, StreamStore, bounded

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
LOWER_PRIORITY_SHARE_DIVISOR = 8
MIN_READ_COUNT = 32
"""Even with tiny batches, read at least this many per round trip: under overload the
expired ones among them are shed at the cost of the read (they never wait for a slot)."""
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
        self.streams = ShardedStreams(
            redis,
            settings.keys,
            settings.served_shards,
            settings.consumer_group,
            settings.consumer_name,
            settings.reply_ttl_s,
            cluster=settings.cluster_mode,
        )
        self.batcher: Batcher[Request] = Batcher(
            settings.max_batch_size,
            settings.batch_window_ms,
            settings.priority_aging_ms,
            adaptive=settings.adaptive_window,
        )
        self.processor = BatchProcessor(self.registry, self.executor, metrics, self.redis_now_ms)
        self.recovery = Recovery(
            self.streams, settings, metrics, self.held, self._admit_reclaimed, self._give_up
        )
        self.control = FleetControl(redis, settings, self.registry, metrics)
        self.limits = Limits(round(settings.batcher_timeout_s * 1000), settings.max_input_bytes)
        # Larger reads under backlog pay (fewer round trips); the buffer bound keeps the
        # priority decision close to the model and the memory use small.
        self.read_count = max(2 * settings.max_batch_size, MIN_READ_COUNT)
        self.read_share = max(1, self.read_count // LOWER_PRIORITY_SHARE_DIVISOR)
        self.buffer_limit = 2 * settings.max_batch_size
        self._read_deadline_s = settings.read_block_ms / 1000 + settings.redis_timeout_s
        self._held: dict[Held, None] = {}
        self._model_in_flight: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(settings.thread_pool_size)
        self._stopping = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._readers: list[asyncio.Task[None]] = []
        self._batch_task: asyncio.Task[None] | None = None
        self._clock_offset_ms = 0.0
        self._batch_ids = itertools.count(1)

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models, join the group, and start the loops."""
        self.executor.start()
        await self._load_models()
        self.status.models_loaded = True
        await self._join_group()
        await self._start_control()
        self.recovery.start()
        self._readers = [
            asyncio.create_task(self._read_loop(store), name=f"bales-read-{shard}")
            for shard, store in self.streams.stores.items()
        ]
        self._batch_task = asyncio.create_task(self._batch_loop(), name="bales-batch")

    async def stop(self) -> None:
        """Stop reading, answer and ack everything already read (within SHUTDOWN_GRACE_S);
        what cannot be finished in time stays pending for another consumer."""
        self.status.stopping = True
        self._stopping.set()
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_s):
                await self._drain()
        except TimeoutError:
            log.warning(
                "shutdown grace of %s s ran out; %d unanswered entries stay pending",
                self.settings.shutdown_grace_s,
                len(self._held),
            )
            for task in [*self._readers, self._batch_task, *self._in_flight]:
                await _cancel(task)
        await self.recovery.stop()
        await self.control.stop()
        if not self._held:
            with contextlib.suppress(RedisError):
                await self.streams.forget_consumer_if_idle()
        await self.streams.aclose()
        self.executor.stop()

    async def _load_models(self) -> None:
        """The models of MODELS_CONFIG, or the default stub; per-model batching limits."""
        path = self.settings.models_config
        if path is None:
            await self.registry.load_default(self.settings.default_model_id)
            return
        configs = load_models_file(path)
        await self.registry.load_all(configs)
        for config in configs:
            self.batcher.set_limits(
                config.model_id,
                config.max_batch_size or self.settings.max_batch_size,
                self.settings.batch_window_ms
                if config.batch_window_ms is None
                else config.batch_window_ms,
            )
        largest = max(c.max_batch_size or self.settings.max_batch_size for c in configs)
        self.read_count = max(2 * largest, MIN_READ_COUNT)
        self.read_share = max(1, self.read_count // LOWER_PRIORITY_SHARE_DIVISOR)
        self.buffer_limit = 2 * largest

    async def _start_control(self) -> None:
        """Follow fleet-wide reloads (a Redis hiccup here only delays the first sync)."""
        try:
            async with bounded(self.settings.redis_timeout_s):
                await self.control.sync()
        except RedisError as exc:
            log.warning("could not read the fleet's model versions yet (%s)", exc)
        await self.control.start()

    async def _drain(self) -> None:
        for reader in self._readers:
            await reader
        await _cancel(self._batch_task)
        for batch in self.batcher.take_all():
            await self._slots.acquire()
            self._dispatch(batch)
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    def held(self) -> list[Held]:
        """(shard, priority, entry id) of every entry read and not yet answered."""
        return list(self._held)

    # ---- the read side ---------------------------------------------------------------

    async def _read_loop(self, store: StreamStore) -> None:
        """Read one shard's streams until stopped (one loop per served shard: a blocking
        read cannot span shards on a cluster)."""
        backoff_s = BACKOFF_START_S
        own_pending_answered = False
        while not self._stopping.is_set():
            await self.batcher.wait_for_room(self.buffer_limit)
            try:
                async with bounded(self._read_deadline_s):
                    if not own_pending_answered:
                        await self._answer_own_pending(store)
                        own_pending_answered = True
                    entries = await store.read(
                        self.read_count, self.read_share, self.settings.read_block_ms
                    )
                    await self._admit(entries)
            except RedisError as exc:
                await self._on_redis_error(exc, backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                continue
            backoff_s = BACKOFF_START_S
            self.status.redis_ok = True

    async def _answer_own_pending(self, store: StreamStore) -> None:
        """Entries delivered to this consumer name before a restart are answered first."""
        after: dict[int, str] = {}
        while entries := await store.read_own_pending(after, self.read_count):
            log.info("answering %d entries left pending by an earlier run", len(entries))
            for entry in entries:
                after[entry.priority] = entry.entry_id
            await self._admit(entries)

    async def _admit(self, entries: list[StreamEntry], retried: bool = False) -> None:
        """Decode entries: good ones go to the batcher; bad and already expired ones are
        answered at once (so an overload sheds expired work at the cost of a read)."""
        rejections: list[Completion] = []
        now_ms = self.redis_now_ms()
        for entry in entries:
            try:
                envelope = read_envelope(
                    entry.entry_id, entry.fields, entry.priority, self.settings.keys, entry.shard
                )
            except Unanswerable as exc:
                await self._dead_letter(entry, exc.reason)
                continue
            try:
                request = decode_request(
                    envelope, entry.fields or {}, self.registry.spec, self.limits
                )
            except RequestRejected as exc:
                self.metrics.count(self._model_label(envelope.model_id), exc.code)
                rejections.append(error_completion(envelope, exc.code, exc.message))
                continue
            if request.deadline_ms <= now_ms:
                self.metrics.count(request.model_id, wire.ERROR_EXPIRED)
                rejections.append(expired_completion(request, now_ms))
                continue
            request.retried = retried
            self._held[(entry.shard, entry.priority, entry.entry_id)] = None
            self.batcher.put(request)
        await self._complete(rejections)

    async def _admit_reclaimed(self, entries: list[StreamEntry]) -> None:
        await self._admit(entries, retried=True)

    async def _dead_letter(self, entry: StreamEntry, reason: str) -> None:
        log.warning(
            "dead-lettering entry %s of p%d: %s",
            entry.entry_id,
            entry.priority,
            reason,
            extra={"entry_id": entry.entry_id, "priority": entry.priority},
        )
        await self.streams.dead_letter(entry, reason)
        self.metrics.dead_letters.inc()

    async def _give_up(self, entry: StreamEntry, deliveries: int) -> None:
        """Dead-letter an entry that failed on every delivery, and tell its client."""
        reason = (
            f"failed on {deliveries - 1} deliveries (MAX_DELIVERIES="
            f"{self.settings.max_deliveries}); moved to "
            f"{self.streams.store(entry.shard).keys.dead_letter}"
        )
        log.warning(
            "giving up on entry %s of p%d: %s",
            entry.entry_id,
            entry.priority,
            reason,
            extra={"entry_id": entry.entry_id, "priority": entry.priority},
        )
        try:
            envelope = read_envelope(
                entry.entry_id, entry.fields, entry.priority, self.settings.keys, entry.shard
            )
        except Unanswerable:
            await self.streams.dead_letter(entry, reason)
        else:
            reply = error_completion(envelope, wire.ERROR_DEAD_LETTER, reason)
            await self.streams.dead_letter(entry, reason, reply)
            self.metrics.count(self._model_label(envelope.model_id), wire.ERROR_DEAD_LETTER)
        self.metrics.dead_letters.inc()

    # ---- the batch side --------------------------------------------------------------

    async def _batch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self.batcher.next_batch(
                    self._model_in_flight.__getitem__, self._max_in_flight_per_model()
                )
            except BaseException:
                self._slots.release()
                raise
            self._dispatch(batch)

    def _dispatch(self, batch: list[Request]) -> None:
        """Start processing a batch that already holds an inference slot."""
        self._model_in_flight[batch[0].model_id] += 1
        self._spawn(self._process(batch))

    def _max_in_flight_per_model(self) -> int:
        """With several models served, one model may fill all but one inference slot, so a
        slow model never holds up the others' batches (0: no limit)."""
        if self.registry.count < 2:
            return 0
        return max(1, self.settings.thread_pool_size - 1)

    async def _process(self, batch: list[Request]) -> None:
        """Compute one batch, then write its replies and ack in one fenced step."""
        batch_id = next(self._batch_ids)
        if log.isEnabledFor(logging.DEBUG):  # per batch: only when asked for
            log.debug(
                "batch %d: %d requests of %s",
                batch_id,
                len(batch),
                batch[0].model_id,
                extra={
                    "batch_id": batch_id,
                    "request_ids": [r.request_id for r in batch],
                    "entry_ids": [f"p{r.priority}:{r.entry_id}" for r in batch],
                    "traceparents": [r.traceparent for r in batch if r.traceparent],
                },
            )
        try:
            outcome = await self.processor.process(batch)
            self._release(outcome.failed)  # unleased: reclaimed after CLAIM_IDLE_MS
            await self._complete(outcome.completions)
        except Exception:  # not the model's fault (that is isolated): leave it to a retry
            log.exception(
                "batch %d failed; its entries are reclaimed after CLAIM_IDLE_MS", batch_id
            )
        finally:
            self._release(batch)  # answered, or unleased so that it is retried
            self._model_in_flight[batch[0].model_id] -= 1
            self._slots.release()
            self.batcher.wake()

    async def _complete(self, completions: list[Completion]) -> None:
        """Write replies and ack; retried on Redis errors (the script is idempotent)."""
        backoff_s = BACKOFF_START_S
        while completions:
            try:
                async with bounded(self.settings.redis_timeout_s):
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

    def _release(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self._held.pop((request.shard, request.priority, request.entry_id), None)

    # ---- helpers ---------------------------------------------------------------------

    async def _join_group(self) -> None:
        backoff_s = BACKOFF_START_S
        while True:
            try:
                async with bounded(self.settings.redis_timeout_s):
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
            _served(self.streams),
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

    def _model_label(self, model_id: str) -> str:
        # Only served model ids become label values: request fields must not grow the series.
        return model_id if self.registry.get(model_id) else "_unknown"

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)


def _served(streams: ShardedStreams) -> str:
    """The streams one consumer reads, for the log: all of them when few, else the shards."""
    if len(streams.stores) == 1:
        return ", ".join(next(iter(streams.stores.values())).keys.streams)
    shards = ",".join(str(shard) for shard in streams.stores)
    return f"shards {shards} of SHARDS={streams.keys.shards} ({streams.keys.stream(0)} ...)"


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
