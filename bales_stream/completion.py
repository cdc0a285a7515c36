"""Answering entries: writing replies and acking (bounded retries), and dead-lettering.

One home for what happens once an entry's outcome is known: ``complete`` writes replies and
acks in one fenced step (``streams``), retried at most ``COMPLETION_ATTEMPTS`` times on
transient Redis errors and never on a permanent one, so a batch never loops on Redis; what
cannot be completed stays pending, to be reclaimed after CLAIM_IDLE_MS and dead-lettered
after MAX_DELIVERIES (``dead_letters``).
"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from .backoff import Backoff
from .metrics import Metrics
from .registry import ModelRegistry
from .replies import Completed, Completion
from .settings import Settings
from .shards import ShardedStreams
from .status import RedisTrouble
from .streams import bounded, is_permanent

log = logging.getLogger(__name__)

COMPLETION_ATTEMPTS = 6
"""Tries of one completion on transient Redis errors (backoff 0.1 .. 3.2 s between them);
after that, or at once on a permanent error, its entries stay pending: reclaimed after
CLAIM_IDLE_MS and dead-lettered after MAX_DELIVERIES, never retried forever."""


class Completer:
    """Writes replies and acks for one consumer."""

    def __init__(
        self,
        streams: ShardedStreams,
        settings: Settings,
        metrics: Metrics,
        trouble: RedisTrouble,
        registry: ModelRegistry,
    ) -> None:
        self.streams = streams
        self.settings = settings
        self.metrics = metrics
        self.trouble = trouble
        self.registry = registry

    async def complete(self, completions: list[Completion]) -> None:
        """Write replies and ack (the script is idempotent, so a retry repeats nothing)."""
        backoff = Backoff()
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
                await self.trouble.back_off(exc, backoff.next_s())
                continue
            self.trouble.answered()
            self._count(done)
            return

    def _count(self, done: Completed) -> None:
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
