"""Leases: the entries this consumer holds (read, not yet answered) and the refresh that keeps
them its own.

One home for the policy: an entry is taken when admitted, released when answered or left
pending for a retry, and while held its idle time in the group is reset every
``CLAIM_IDLE_MS / 3`` (``refresh``, fenced by ``scripts.LEASE_LUA``), so no other consumer
reclaims it while it waits or runs. Reclaim asks ``holds`` so that this consumer never
retries or gives up on what it still holds.
"""

from __future__ import annotations

from collections.abc import Iterable

from .protocol import Request
from .shards import Held, ShardedStreams
from .streams import StreamEntry


class Leases:
    """What one consumer holds, as (shard, priority, entry id), in admission order."""

    def __init__(self, streams: ShardedStreams) -> None:
        self.streams = streams
        self._held: dict[Held, None] = {}

    def take(self, entry: StreamEntry) -> None:
        """Hold an admitted entry until it is answered."""
        self._held[(entry.shard, entry.priority, entry.entry_id)] = None

    def release(self, requests: Iterable[Request]) -> None:
        """Forget requests that were answered, or are left pending for a retry."""
        for request in requests:
            self._held.pop((request.shard, request.priority, request.entry_id), None)

    def holds(self, entry: StreamEntry) -> bool:
        """True while ``entry`` is held."""
        return (entry.shard, entry.priority, entry.entry_id) in self._held

    def held(self) -> list[Held]:
        """Every held entry."""
        return list(self._held)

    async def refresh(self) -> int:
        """Reset the idle time of every held entry; how many another consumer holds now."""
        return await self.streams.refresh_lease(self.held())
