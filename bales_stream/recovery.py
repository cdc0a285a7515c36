"""Upkeep that makes at-least-once delivery work: leases, reclaiming, trimming.

Three periodic loops (run by the worker's ``Supervisor``), each tolerant of Redis errors
(logged, counted, retried next tick):

* lease: every ``CLAIM_IDLE_MS / 3`` the worker resets the idle time of every entry it holds
  (read but not yet answered), so a slow batch or a deep buffer is never reclaimed by
  another consumer just for being slow;
* reclaim: every ``CLAIM_IDLE_MS / 2`` it XAUTOCLAIMs entries idle for ``CLAIM_IDLE_MS``
  (their consumer died, stalled, or left them pending after the model raised), following the
  cursor; an entry delivered more than ``MAX_DELIVERIES`` times is dead-lettered instead;
* trim: every ``TRIM_INTERVAL_S`` it trims each stream below what the group still needs
  (``XTRIM MINID``), so memory stays bounded without ever dropping an accepted request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

from .admission import Admission
from .dead_letters import DeadLetters
from .leases import Leases
from .metrics import Metrics
from .settings import Settings
from .shards import ShardedStreams
from .status import RedisTrouble
from .streams import bounded

log = logging.getLogger(__name__)

CLAIM_BATCH = 100
"""Entries per XAUTOCLAIM call; one reclaim pass takes at most this many per stream."""


class Recovery:
    """The lease, reclaim and trim loops of one worker."""

    def __init__(
        self,
        streams: ShardedStreams,
        settings: Settings,
        metrics: Metrics,
        admission: Admission,
        leases: Leases,
        dead_letters: DeadLetters,
        trouble: RedisTrouble,
    ) -> None:
        self.streams = streams
        self.settings = settings
        self.metrics = metrics
        self.admission = admission
        self.leases = leases
        self.dead_letters = dead_letters
        self.trouble = trouble
        self._cursors = {
            (shard, priority): "0-0"
            for shard in streams.stores
            for priority in range(settings.priority_levels)
        }

    def loops(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """The three loops by task name, for the supervisor to run."""
        idle_s = self.settings.claim_idle_ms / 1000
        return {
            "lease": lambda: self._every(idle_s / 3, self.refresh_lease),
            "reclaim": lambda: self._every(idle_s / 2, self.reclaim),
            "trim": lambda: self._every(self.settings.trim_interval_s, self.trim),
        }

    async def refresh_lease(self) -> None:
        """Reset the idle time of everything this worker holds."""
        lost = await self.leases.refresh()
        if lost:
            log.warning("%d held entries were claimed by another consumer", lost)

    async def reclaim(self) -> None:
        """Take over entries idle longer than CLAIM_IDLE_MS, one pass over every stream of
        every served shard."""
        for (shard, priority), cursor in list(self._cursors.items()):
            claimed = await self.streams.store(shard).reclaim(
                priority, cursor, self.settings.claim_idle_ms, CLAIM_BATCH
            )
            self._cursors[(shard, priority)] = claimed.cursor
            # Our own held entries whose lease ran late come back too: they are alive here,
            # so they are neither retried nor given up on.
            orphans = [e for e in claimed.entries if not self.leases.holds(e)]
            if not orphans:
                continue
            log.info("reclaimed %d idle entries of shard %d p%d", len(orphans), shard, priority)
            self.metrics.reclaimed.inc(len(orphans))
            retry = []
            for entry in orphans:
                deliveries = claimed.deliveries.get(entry.entry_id, 1)
                if deliveries > self.settings.max_deliveries:
                    await self.dead_letters.give_up(entry, deliveries)
                else:
                    retry.append(entry)
            await self.admission.admit(retry, retried=True)

    async def trim(self) -> None:
        """Trim every stream below the oldest entry the group still needs, and remove dead
        consumers (idle past ``DEAD_CONSUMER_IDLE_S`` with nothing pending) from the group."""
        trimmed = await self.streams.trim()
        if trimmed:
            log.debug("trimmed %d answered entries", trimmed)
        idle_ms = int(self.settings.dead_consumer_idle_s * 1000)
        for name in await self.streams.forget_dead_consumers(idle_ms):
            log.info(
                "removed consumer %s from the group: idle over %.0f s with nothing pending",
                name,
                self.settings.dead_consumer_idle_s,
            )

    async def _every(self, interval_s: float, tick: Callable[[], Awaitable[None]]) -> None:
        """Run ``tick`` every ``interval_s``; a Redis error is retried next tick, and one that
        retrying cannot cure stands as a problem in /ready and /health until a tick works."""
        key = f"loop:{tick.__name__}"
        while True:
            await asyncio.sleep(interval_s)
            try:
                async with bounded(self.settings.redis_timeout_s):
                    await tick()
            except RedisError as exc:
                self.metrics.redis_errors.inc()
                self.trouble.stands(key, exc)
                log.warning(
                    "%s failed (%s: %s); retrying next tick", tick.__name__, type(exc).__name__, exc
                )
            else:
                self.trouble.answered(key)
