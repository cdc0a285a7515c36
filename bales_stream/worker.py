"""The worker: one consumer of the group. Read -> decode -> batch -> infer -> reply -> ack.

The worker runs the loops over the parts ``service.build_worker`` wires, each a task of the
``Supervisor``, so that reading overlaps with inference:

* a read loop per served shard XREADGROUPs new entries (only while the batcher has room)
  and hands them to ``Admission`` (decode, answer the bad ones at once, batch the rest);
* the batch loop takes each ready batch (while an inference slot is free) and hands it to
  the ``BatchProcessor``; the slot is given back, then the ``Completer`` writes every reply
  and acks in one fenced step;
* ``Recovery``'s lease, reclaim and trim loops, the fleet-control listener and the clock.

Every entry read stays held (``leases``) until it is answered, so nothing a
live worker holds is reclaimed by another, and nothing a dead worker held is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from .admission import Admission
from .backoff import Backoff
from .batcher import Batcher
from .clock import REFRESH_S, RedisClock
from .completion import Completer
from .control import FleetControl
from .inference import InferenceExecutor
from .leases import Leases
from .metrics import Metrics
from .model_config import load_models_file
from .processing import MAX_BATCHES_PER_HANDOFF, BatchProcessor
from .protocol import Request
from .recovery import Recovery
from .registry import ModelRegistry
from .settings import Settings
from .shards import UNSHARDED, Held, ShardedStreams, shard_label
from .status import RedisTrouble, WorkerStatus
from .streams import StreamStore, bounded
from .supervisor import Supervisor

log = logging.getLogger(__name__)

LOWER_PRIORITY_SHARE_DIVISOR = 8
"""Each read reserves 1/8 of its entries for every lower priority level (see streams)."""
QUEUE_PROBE_TIMEOUT_S = 1.0
"""How long /health and /metrics wait for the queue statistics."""
MIN_READ_COUNT = 32
"""Even with tiny batches, read at least this many per round trip: under overload the
expired ones among them are shed at the cost of the read (they never wait for a slot)."""


@dataclass(frozen=True)
class ReadPlan:
    """How a read loop reads: ``count`` entries a read, of which ``share`` are kept for each
    lower priority level (see ``streams``), while fewer than ``buffer_limit`` requests per
    batch key wait in the batcher."""

    count: int
    share: int
    buffer_limit: int

    @classmethod
    def for_batches_of(cls, max_batch_size: int) -> ReadPlan:
        """The plan for a largest batch of ``max_batch_size``. Larger reads under backlog
        pay (fewer round trips). The buffer holds enough full batches for one grouped
        hand-off (``processing.MAX_BATCHES_PER_HANDOFF``): its bound keeps the priority
        decision close to the model and the memory use small."""
        count = max(2 * max_batch_size, MIN_READ_COUNT)
        return cls(
            count,
            max(1, count // LOWER_PRIORITY_SHARE_DIVISOR),
            MAX_BATCHES_PER_HANDOFF * max_batch_size,
        )


@dataclass(frozen=True)
class Parts:
    """The collaborators of one worker, built by ``service.build_worker`` (the composition
    root): the worker runs its loops over them and builds none of them."""

    supervisor: Supervisor
    status: WorkerStatus
    clock: RedisClock
    executor: InferenceExecutor
    registry: ModelRegistry
    streams: ShardedStreams
    batcher: Batcher[Request]
    processor: BatchProcessor
    trouble: RedisTrouble
    completer: Completer
    leases: Leases
    admission: Admission
    recovery: Recovery
    control: FleetControl
    stopping: asyncio.Event
    """Set when a stop is asked (shared with ``trouble``, whose backoffs it cuts short)."""


class Worker:
    """One consumer of the group; ``start()`` it, ``stop()`` it for a graceful drain."""

    def __init__(self, settings: Settings, metrics: Metrics, parts: Parts) -> None:
        self.settings = settings
        self.metrics = metrics
        self.supervisor = parts.supervisor
        self.status = parts.status
        self.clock = parts.clock
        self.executor = parts.executor
        self.registry = parts.registry
        self.streams = parts.streams
        self.batcher = parts.batcher
        self.processor = parts.processor
        self._stopping = parts.stopping
        self.trouble = parts.trouble
        self.completer = parts.completer
        self.leases = parts.leases
        self.admission = parts.admission
        self.recovery = parts.recovery
        self.control = parts.control
        self.plan = ReadPlan.for_batches_of(settings.max_batch_size)
        self._read_deadline_s = settings.read_block_ms / 1000 + settings.redis_timeout_s
        self._model_in_flight: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(settings.thread_pool_size)
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
        await self.supervisor.cancel("reclaim")  # a draining consumer takes over nothing
        try:
            async with asyncio.timeout(self.settings.shutdown_grace_s):
                await self._drain()
        except TimeoutError:
            log.warning(
                "shutdown grace of %s s ran out; %d unanswered entries stay pending",
                self.settings.shutdown_grace_s,
                len(self.leases.held()),
            )
            for task in self._in_flight:
                await _cancel(task)
        await self.supervisor.stop()
        if not self.leases.held():
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
        self.plan = ReadPlan.for_batches_of(largest)

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
            self._dispatch([batch])
        if self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    # ---- what the sidecar and the CLI may ask ---------------------------------------------

    async def queue_report(self) -> list[dict[str, Any]] | None:
        """Per served shard and priority: length, lag, pending, oldest age, consumers (None
        when Redis does not answer within ``QUEUE_PROBE_TIMEOUT_S``; the error is kept in the
        status). Also updates the queue gauges."""
        try:
            async with asyncio.timeout(QUEUE_PROBE_TIMEOUT_S):
                stats = await self.streams.queue_stats()
        except (RedisError, TimeoutError) as exc:
            self.status.last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.forget_queues()
            return None
        self.metrics.observe_queues(stats)
        return [
            {
                "shard": None if s.shard == UNSHARDED else s.shard,
                "priority": s.priority,
                "stream": self.streams.stream(s.shard, s.priority),
                "length": s.length,
                "lag": s.lag,
                "pending": s.pending,
                "oldest_age_s": None if s.oldest_age_s is None else round(s.oldest_age_s, 3),
                "consumers": s.consumers,
            }
            for s in stats
        ]

    async def health(self) -> dict[str, Any]:
        """The /health document: readiness, identity, Redis, models, queues, tasks."""
        queues = await self.queue_report()
        settings = self.settings
        return {
            "status": "ok" if self.status.ready and queues is not None else "degraded",
            "ready": self.status.ready,
            "consumer": settings.consumer_name,
            "group": settings.consumer_group,
            "redis": {
                "url": settings.redis_url_masked,
                "reachable": queues is not None,
                "last_error": self.status.last_error,
            },
            "event_loop": _loop_name(),
            "models": {
                model_id: {
                    "version": model.version,
                    "model_type": model.spec.model_type,
                    "input_shape": list(model.spec.input_shape),
                    "inputs": [
                        {"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
                        for s in model.spec.inputs
                    ],
                    "max_dims": dict(model.spec.max_dims),
                    "takes_text": model.spec.text,
                }
                for model_id, model in self.registry.models().items()
            },
            "queues": queues,
            "batcher": {"waiting": len(self.batcher)},
            "tasks": self.supervisor.report(),
            "problems": self.status.problems,
        }

    async def reload(
        self, model_id: str, weights_path: str, sha256: str | None = None
    ) -> dict[str, object]:
        """Reload a model here and on every consumer (see ``control``)."""
        return await self.control.reload(model_id, weights_path, sha256)

    async def refresh_metrics(self) -> None:
        """Bring the queue gauges and the served-models gauge up to date (before a scrape)."""
        await self.queue_report()
        served = self.registry.models()
        self.metrics.observe_models({model_id: m.version for model_id, m in served.items()})

    async def exposition(self) -> bytes:
        """The Prometheus text of this consumer's metrics, refreshed."""
        await self.refresh_metrics()
        return self.metrics.exposition()

    def held(self) -> list[Held]:
        """(shard, priority, entry id) of every entry read and not yet answered."""
        return self.leases.held()

    # ---- the read side ---------------------------------------------------------------

    async def _read_loop(self, store: StreamStore) -> None:
        """Read one shard's streams until stopped (one loop per served shard: a blocking
        read cannot span shards on a cluster). Starts with this consumer's own pending
        entries, so a restart (of the task or of the process) answers what it had taken."""
        backoff = Backoff()
        own_pending_answered = False
        while not self._stopping.is_set():
            await self.batcher.wait_for_room(self.plan.buffer_limit)
            try:
                async with bounded(self._read_deadline_s):
                    if not own_pending_answered:
                        await self._answer_own_pending(store)
                        own_pending_answered = True
                    entries = await store.read(
                        self.plan.count, self.plan.share, self.settings.read_block_ms
                    )
                    await self.admission.admit(entries)
            except RedisError as exc:
                self.trouble.stands(f"read:{store.shard}", exc)
                await self.trouble.back_off(exc, backoff.next_s())
                continue
            backoff.reset()
            self.trouble.answered(f"read:{store.shard}")

    async def _answer_own_pending(self, store: StreamStore) -> None:
        """Entries delivered to this consumer name and not answered are answered first
        (except those it holds right now: a restarted read task finds them pending too)."""
        after: dict[int, str] = {}
        while entries := await store.read_own_pending(after, self.plan.count):
            for entry in entries:
                after[entry.priority] = entry.entry_id
            orphans = [e for e in entries if not self.leases.holds(e)]
            if orphans:
                log.info("answering %d entries left pending by an earlier run", len(orphans))
                await self.admission.admit(orphans)

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
            model_id = batch[0].model_id
            more = self.processor.batches_per_handoff(model_id) - 1
            self._dispatch([batch, *self.batcher.take_full(model_id, more)])

    def _dispatch(self, batches: list[list[Request]]) -> None:
        """Start processing batches of one model that already hold an inference slot."""
        self._model_in_flight[batches[0][0].model_id] += 1
        self._spawn(self._process(batches))

    def _max_in_flight_per_model(self) -> int:
        """With several models served, one model may fill all but one inference slot, so a
        slow model never holds up the others' batches (0: no limit)."""
        if self.registry.count < 2:
            return 0
        return max(1, self.settings.thread_pool_size - 1)

    async def _process(self, batches: list[list[Request]]) -> None:
        """Compute batches of one model, give back their inference slot, then write their
        replies and ack in one fenced step (waiting on Redis never holds a slot)."""
        batch_ids = [next(self._batch_ids) for _ in batches]
        for batch_id, batch in zip(batch_ids, batches, strict=True):
            _log_batch(batch_id, batch)
        try:
            try:
                outcome = await self.processor.process(batches)
            finally:
                self._model_in_flight[batches[0][0].model_id] -= 1
                self._slots.release()
                self.batcher.wake()
            self.leases.release(outcome.failed)  # unleased: reclaimed after CLAIM_IDLE_MS
            completing_s = time.monotonic()
            await self.completer.complete(outcome.completions)
            self.metrics.observe_stages(completion=time.monotonic() - completing_s)
        except Exception:  # not the model's fault (that is isolated): leave it to a retry
            log.exception(
                "batches %s failed; their entries are reclaimed after CLAIM_IDLE_MS",
                ",".join(map(str, batch_ids)),
            )
        finally:
            for batch in batches:  # answered, or unleased so that it is retried
                self.leases.release(batch)

    # ---- helpers ---------------------------------------------------------------------

    async def _join_group(self) -> None:
        backoff = Backoff()
        while True:
            try:
                async with bounded(self.settings.redis_timeout_s):
                    await self.streams.ensure_groups()
                    await self.clock.sync(self.streams.redis_time_ms)
                break
            except RedisError as exc:
                await self.trouble.back_off(exc, backoff.next_s())
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


def _loop_name() -> str:
    """``uvloop`` or ``asyncio``: the event loop this worker runs on."""
    return "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
