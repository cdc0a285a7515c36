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
import functools
import itertools
import logging
from collections import Counter
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from bales_producer import wire
from redis.exceptions import RedisError, ResponseError

from .batcher import Batcher
from .clock import REFRESH_S, RedisClock
from .control import FleetControl
from .errors import RequestRejected, Unanswerable
from .inference import InferenceExecutor
from .metrics import Metrics
from .model_config import load_models_file
from .processing import BatchProcessor
from .protocol import Envelope, Limits, Request, decode_request, entry_time_ms, read_envelope
from .recovery import Recovery
from .registry import ModelRegistry
from .replies import Completion, error_completion, expired_completion
from .settings import Settings
from .shards import Held, ShardedStreams, shard_label
from .streams import Completed, StreamEntry, StreamStore, bounded, is_permanent
from .supervisor import Supervisor

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
COMPLETION_ATTEMPTS = 6
"""Tries of one completion on transient Redis errors (backoff 0.1 .. 3.2 s between them);
after that, or at once on a permanent error, its entries stay pending: reclaimed after
CLAIM_IDLE_MS and dead-lettered after MAX_DELIVERIES, never retried forever."""
FUTURE_TOLERANCE_MS = 1000
"""An entry ID this far ahead of Redis's clock is counted and logged as from the future."""
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
    supervisor: Supervisor | None = None

    @property
    def task_problems(self) -> list[str]:
        """Long-lived tasks that are down or restarting in a loop (see ``supervisor``)."""
        return self.supervisor.problems() if self.supervisor is not None else []

    @property
    def ready(self) -> bool:
        """Ready to take traffic: models loaded, group joined, Redis reachable, every
        long-lived task up."""
        return (
            self.models_loaded
            and self.group_joined
            and self.redis_ok
            and not self.stopping
            and not self.task_problems
        )


class Worker:
    """One consumer of the group; ``start()`` it, ``stop()`` it for a graceful drain."""

    def __init__(self, settings: Settings, redis: aioredis.Redis, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.supervisor = Supervisor(metrics)
        self.status = WorkerStatus(supervisor=self.supervisor)
        self.clock = RedisClock()
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
            max_input_bytes=settings.max_input_bytes,
        )
        self.batcher: Batcher[Request] = Batcher(
            settings.max_batch_size,
            settings.batch_window_ms,
            settings.priority_aging_ms,
            adaptive=settings.adaptive_window,
        )
        self.processor = BatchProcessor(self.registry, self.executor, metrics, self.clock.now_ms)
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
        self._readers = [f"read-{shard_label(shard)}" for shard in self.streams.stores]
        self._batch_ids = itertools.count(1)

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Load the models, join the group, and start the supervised tasks."""
        self.executor.start()
        await self._load_models()
        self.status.models_loaded = True
        await self._join_group()
        await self._sync_control()
        for name, run in self.recovery.loops().items():
            self.supervisor.start(name, run)
        self.supervisor.start("control", self.control.listen)
        self.supervisor.start("clock", self._clock_loop)
        for name, store in zip(self._readers, self.streams.stores.values(), strict=True):
            self.supervisor.start(name, functools.partial(self._read_loop, store))
        self.supervisor.start("batch", self._batch_loop)

    @property
    def failed(self) -> asyncio.Event:
        """Set when a long-lived task cannot stay up: the process should exit non-zero."""
        return self.supervisor.failed

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
            for task in self._in_flight:
                await _cancel(task)
        await self.supervisor.stop()
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

    async def _sync_control(self) -> None:
        """Serve the fleet's model versions before reading (a Redis hiccup here only delays
        the first sync: the control task syncs again once subscribed)."""
        try:
            async with bounded(self.settings.redis_timeout_s):
                await self.control.sync()
        except RedisError as exc:
            log.warning("could not read the fleet's model versions yet (%s)", exc)

    async def _drain(self) -> None:
        for name in self._readers:
            await self.supervisor.join(name)
        await self.supervisor.cancel("batch")
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
        read cannot span shards on a cluster). Starts with this consumer's own pending
        entries, so a restart (of the task or of the process) answers what it had taken."""
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
        """Entries delivered to this consumer name and not answered are answered first
        (except those it holds right now: a restarted read task finds them pending too)."""
        after: dict[int, str] = {}
        while entries := await store.read_own_pending(after, self.read_count):
            for entry in entries:
                after[entry.priority] = entry.entry_id
            orphans = [e for e in entries if (e.shard, e.priority, e.entry_id) not in self._held]
            if orphans:
                log.info("answering %d entries left pending by an earlier run", len(orphans))
                await self._admit(orphans)

    async def _admit(self, entries: list[StreamEntry], retried: bool = False) -> None:
        """Decode entries: good ones go to the batcher; bad and already expired ones are
        answered at once (so an overload sheds expired work at the cost of a read). An
        unexpected failure on one entry is contained to that entry (``_contain``)."""
        replies: list[Completion] = []
        now_ms = self.clock.now_ms()
        for entry in entries:
            try:
                reply = await self._admit_one(entry, now_ms, retried)
            except RedisError:
                raise  # the caller's retry (the entry stays pending: reclaimed later)
            except Exception as exc:
                reply = await self._contain(entry, exc)
            if reply is not None:
                replies.append(reply)
        await self._complete(replies)

    async def _admit_one(
        self, entry: StreamEntry, now_ms: float, retried: bool
    ) -> Completion | None:
        """Batch one entry, or return the reply it gets at once (None if dead-lettered)."""
        try:
            envelope = self._envelope(entry)
        except Unanswerable as exc:
            await self._dead_letter(entry, exc.reason)
            return None
        try:
            request = decode_request(
                envelope,
                entry.fields or {},
                self.registry.spec,
                self.limits,
                now_ms,
                entry.withheld,
            )
        except RequestRejected as exc:
            self.metrics.count(self._model_label(envelope.model_id), exc.code)
            return error_completion(envelope, exc.code, exc.message)
        self._note_future(entry, now_ms)
        if request.deadline_ms <= now_ms:
            self.metrics.count(request.model_id, wire.ERROR_EXPIRED)
            return expired_completion(request, now_ms)
        request.retried = retried
        self.batcher.put(request)
        self._held[(entry.shard, entry.priority, entry.entry_id)] = None
        return None

    def _envelope(self, entry: StreamEntry) -> Envelope:
        return read_envelope(
            entry.entry_id,
            entry.fields,
            entry.priority,
            self.settings.keys,
            entry.shard,
            entry.withheld,
        )

    async def _contain(self, entry: StreamEntry, exc: Exception) -> Completion | None:
        """An entry the service failed on unexpectedly (a bug, never the client's fault
        alone): answered ``internal`` and acked, or dead-lettered if it has no usable
        request_id; never left to stop a loop or to be read again and again."""
        log.error(
            "unexpected failure on entry %s of p%d; answering it 'internal'",
            entry.entry_id,
            entry.priority,
            exc_info=exc,
        )
        self.metrics.contained.inc()
        problem = f"{type(exc).__name__}: {str(exc)[:200]}"
        try:
            envelope = self._envelope(entry)
        except Exception:
            await self._dead_letter(entry, f"the service failed on this entry ({problem})")
            return None
        self.metrics.count(self._model_label(envelope.model_id), wire.ERROR_INTERNAL)
        message = f"the service failed on this request ({problem}); it was not computed"
        return error_completion(envelope, wire.ERROR_INTERNAL, message)

    def _note_future(self, entry: StreamEntry, now_ms: float) -> None:
        """Count (and log) an entry whose ID is ahead of Redis's clock: its enqueue time was
        clamped to now (see ``protocol.decode_request``)."""
        ahead_ms = entry_time_ms(entry.entry_id) - now_ms
        if ahead_ms > FUTURE_TOLERANCE_MS:
            self.metrics.future_entries.inc()
            log.warning(
                "entry %s of p%d is %.0f ms ahead of Redis's clock (an explicit XADD ID?): "
                "its enqueue time is taken as now",
                entry.entry_id,
                entry.priority,
                ahead_ms,
            )

    async def _admit_reclaimed(self, entries: list[StreamEntry]) -> None:
        await self._admit(entries, retried=True)

    async def _dead_letter(
        self, entry: StreamEntry, reason: str, reply: Completion | None = None
    ) -> None:
        log.warning(
            "dead-lettering entry %s of p%d: %s",
            entry.entry_id,
            entry.priority,
            reason,
            extra={"entry_id": entry.entry_id, "priority": entry.priority},
        )
        if not await self.streams.dead_letter(entry, reason, reply):
            log.error(
                "the dead-letter stream of shard %s cannot take records (a key of another "
                "type?): entry %s of p%d was acked without a record",
                shard_label(entry.shard),
                entry.entry_id,
                entry.priority,
            )
        self.metrics.dead_letters.inc()

    async def _give_up(self, entry: StreamEntry, deliveries: int) -> None:
        """Dead-letter an entry that failed on every delivery, and tell its client."""
        reason = (
            f"failed on {deliveries - 1} deliveries (MAX_DELIVERIES="
            f"{self.settings.max_deliveries}); moved to "
            f"{self.streams.store(entry.shard).keys.dead_letter}"
        )
        try:
            envelope = self._envelope(entry)
        except Exception:  # no usable request_id: nobody to tell
            await self._dead_letter(entry, reason)
            return
        reply = error_completion(envelope, wire.ERROR_DEAD_LETTER, reason)
        await self._dead_letter(entry, reason, reply)
        self.metrics.count(self._model_label(envelope.model_id), wire.ERROR_DEAD_LETTER)

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
        """Compute one batch, give back its inference slot, then write its replies and ack
        in one fenced step (waiting on Redis never holds a slot)."""
        batch_id = next(self._batch_ids)
        _log_batch(batch_id, batch)
        try:
            try:
                outcome = await self.processor.process(batch)
            finally:
                self._model_in_flight[batch[0].model_id] -= 1
                self._slots.release()
                self.batcher.wake()
            self._release(outcome.failed)  # unleased: reclaimed after CLAIM_IDLE_MS
            await self._complete(outcome.completions)
        except Exception:  # not the model's fault (that is isolated): leave it to a retry
            log.exception(
                "batch %d failed; its entries are reclaimed after CLAIM_IDLE_MS", batch_id
            )
        finally:
            self._release(batch)  # answered, or unleased so that it is retried

    async def _complete(self, completions: list[Completion]) -> None:
        """Write replies and ack (``COMPLETION_ATTEMPTS`` tries on transient Redis errors;
        the script is idempotent, so a retry repeats nothing). What cannot be completed
        stays pending: reclaimed after CLAIM_IDLE_MS, dead-lettered after MAX_DELIVERIES."""
        backoff_s = BACKOFF_START_S
        for attempt in range(1, COMPLETION_ATTEMPTS + 1):
            if not completions:
                return
            try:
                async with bounded(self.settings.redis_timeout_s):
                    done = await self.streams.complete(completions)
            except RedisError as exc:
                if is_permanent(exc) or attempt == COMPLETION_ATTEMPTS:
                    self.metrics.redis_errors.inc()
                    log.error(
                        "could not complete %d entries (%s: %s); they stay pending for a retry",
                        len(completions),
                        type(exc).__name__,
                        exc,
                    )
                    return
                await self._on_redis_error(exc, backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                continue
            self.status.redis_ok = True
            self._count_completed(done)
            return

    def _count_completed(self, done: Completed) -> None:
        if done.stale:
            log.warning("%d replies dropped: their entries are no longer ours", done.stale)
            self.metrics.stale_completions.inc(done.stale)
        if done.bad_reply_keys or done.bad_inboxes:
            log.warning(
                "%d reply keys and %d reply_to inboxes hold another type: those replies "
                "were skipped (the entries are acked)",
                done.bad_reply_keys,
                done.bad_inboxes,
            )
            self.metrics.undeliverable.labels("reply").inc(done.bad_reply_keys)
            self.metrics.undeliverable.labels("inbox").inc(done.bad_inboxes)

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
                    await self.clock.sync(self.streams.redis_time_ms)
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

    async def _clock_loop(self) -> None:
        """Re-estimate Redis's clock every ``clock.REFRESH_S``."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                async with bounded(self.settings.redis_timeout_s):
                    await self.clock.sync(self.streams.redis_time_ms)
            except RedisError as exc:
                log.warning("could not read Redis's clock (%s); keeping the last offset", exc)

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


def _log_batch(batch_id: int, batch: list[Request]) -> None:
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
