"""Admission: entries read from Redis become batched requests or immediate replies.

Whatever a client wrote, one entry affects that entry only. Each is decoded and checked
(``protocol``); a malformed one is answered ``invalid_request`` (or ``unknown_model``), one
whose deadline has passed ``expired``, one without a usable request_id is dead-lettered, and
an unexpected failure on one (a bug: never the client's fault alone) is answered
``internal``: all of them acked, none left to stop a loop or to be read again and again.
The rest go to the batcher and are held (``leases``) until answered.
"""

from __future__ import annotations

import logging

from bales_producer import wire
from redis.exceptions import RedisError

from .batcher import Batcher
from .clock import RedisClock
from .completion import Completer
from .dead_letters import DeadLetters
from .errors import RequestRejected, Unanswerable
from .leases import Leases
from .metrics import Metrics
from .protocol import Envelope, Limits, Request, decode_request, entry_time_ms, read_envelope
from .registry import ModelRegistry
from .replies import Completion, error_completion, expired_completion
from .settings import Settings
from .streams import StreamEntry

log = logging.getLogger(__name__)

FUTURE_TOLERANCE_MS = 1000
"""An entry ID this far ahead of Redis's clock is counted and logged as from the future."""


class Admission:
    """Admits entries into the batcher and keeps the ledger of what is held."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        batcher: Batcher[Request],
        clock: RedisClock,
        metrics: Metrics,
        completer: Completer,
        dead_letters: DeadLetters,
        leases: Leases,
    ) -> None:
        self.keys = settings.keys
        self.limits = Limits(round(settings.batcher_timeout_s * 1000), settings.max_input_bytes)
        self.registry = registry
        self.batcher = batcher
        self.clock = clock
        self.metrics = metrics
        self.completer = completer
        self.dead_letters = dead_letters
        self.leases = leases

    async def admit(self, entries: list[StreamEntry], retried: bool = False) -> None:
        """Batch good entries; answer (and ack) the rest at once, in one completion."""
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
        await self.completer.complete(replies)

    async def _admit_one(
        self, entry: StreamEntry, now_ms: float, retried: bool
    ) -> Completion | None:
        """Batch one entry, or return the reply it gets at once (None if dead-lettered)."""
        try:
            envelope = self._envelope(entry)
        except Unanswerable as exc:
            await self.dead_letters.move(entry, exc.reason)
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
            self.metrics.count(self.registry.metric_label(envelope.model_id), exc.code)
            return error_completion(envelope, exc.code, exc.message)
        self._note_future(entry, now_ms)
        if request.deadline_ms <= now_ms:
            self.metrics.count(request.model_id, wire.ERROR_EXPIRED)
            return expired_completion(request, now_ms)
        request.retried = retried
        self.batcher.put(request)
        self.leases.take(entry)
        return None

    def _envelope(self, entry: StreamEntry) -> Envelope:
        return read_envelope(
            entry.entry_id,
            entry.fields,
            entry.priority,
            self.keys,
            entry.shard,
            entry.withheld,
        )

    async def _contain(self, entry: StreamEntry, exc: Exception) -> Completion | None:
        """An entry the service failed on unexpectedly: answered ``internal`` (acked), or
        dead-lettered if it has no usable request_id."""
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
            await self.dead_letters.move(entry, f"the service failed on this entry ({problem})")
            return None
        self.metrics.count(self.registry.metric_label(envelope.model_id), wire.ERROR_INTERNAL)
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
