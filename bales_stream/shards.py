"""Every shard one consumer serves: a ``StreamStore`` per shard, addressed as one.

With ``SHARDS=S`` each shard's request streams carry their own hash tag
(``bales:{requests.k}:p0`` ...), so on Redis Cluster the shards spread over the primaries;
no script or blocking read may span two shards. The worker therefore runs one read loop per
served shard (``stores``), and everything that answers or keeps entries (completion, dead
letters, leases, reclaiming, trimming, stats) is routed here to the store of the entry's
shard. With one shard this is a thin pass-through. While ``SHARDS`` > 1, the v1 streams
(``bales:{requests}:p*``) are served too (``UNSHARDED``), for producers that predate sharding.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import replace
from typing import Any

from bales_producer import wire

from .cluster_nodes import NodeClients
from .cluster_writes import ClusterWrites
from .queues import QueueStats
from .replies import Completed, Completion
from .streams import StreamEntry, StreamStore

log = logging.getLogger(__name__)

UNSHARDED = -1
"""Shard id of the v1 streams (``bales:{requests}:p*``) while ``SHARDS`` > 1: every consumer
that serves shard 0 reads them too, so producers that predate sharding are still served."""

Held = tuple[int, int, str]
"""(shard, priority, entry id) of an entry a worker has read and not yet answered."""


class ShardedStreams:
    """The request streams of the shards one consumer serves, in one group."""

    def __init__(
        self,
        redis: Any,
        keys: wire.KeySpace,
        shards: tuple[int, ...],
        group: str,
        consumer: str,
        reply_ttl_s: int,
        cluster: bool = False,
        max_input_bytes: int = 1_048_576,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.cluster_writes = ClusterWrites(NodeClients(redis)) if cluster else None
        """The topology, chosen once: how a cluster's replies, acks and dead letters are
        written (shared by every shard; None on a single node)."""
        self.stores = {
            shard: StreamStore(
                redis,
                space,
                group,
                consumer,
                reply_ttl_s,
                cluster_writes=self.cluster_writes,
                shard=shard,
                max_input_bytes=max_input_bytes,
            )
            for shard, space in serving_plan(keys, shards).items()
        }

    def store(self, shard: int) -> StreamStore:
        """The store of one served shard."""
        return self.stores[shard]

    def stream(self, shard: int, priority: int) -> str:
        """The name of one served shard's request stream of one priority."""
        return self.stores[shard].keys.stream(priority)

    @property
    def all_streams(self) -> list[str]:
        """Every request stream served, shard by shard, highest priority first."""
        return [name for store in self.stores.values() for name in store.keys.streams]

    async def ensure_groups(self) -> None:
        """Create the group on every served stream, and publish the fleet's shard count
        (producers that are not told ``shards`` read it)."""
        for store in self.stores.values():
            await store.ensure_groups()
        await self.publish_shard_count()

    async def publish_shard_count(self) -> None:
        """Set ``keys.shard_count`` to SHARDS; warn when the fleet said otherwise."""
        previous = await self.redis.set(self.keys.shard_count, self.keys.shards, get=True)
        if previous is not None and previous != str(self.keys.shards).encode():
            log.warning(
                "the fleet's shard count changes from %s to %d (%s): producers that read it "
                "before keep using the old count; requests on shards no consumer serves wait",
                previous.decode() if isinstance(previous, bytes) else previous,
                self.keys.shards,
                self.keys.shard_count,
            )

    async def complete(self, completions: list[Completion]) -> Completed:
        """Answer and ack, per shard (concurrently; on a cluster in two steps for all
        shards)."""
        if not completions:
            return Completed()
        by_shard = _group(completions, lambda done: done.shard)
        if self.cluster_writes is not None:  # all shards' replies and acks in two steps
            return await self.cluster_writes.complete(
                [(self.stores[shard], part) for shard, part in by_shard.items()]
            )
        if len(by_shard) == 1:
            ((shard, part),) = by_shard.items()
            return await self.stores[shard].complete(part)
        done = await asyncio.gather(
            *(self.stores[shard].complete(part) for shard, part in by_shard.items())
        )
        return sum(done, Completed())

    async def dead_letter(
        self, entry: StreamEntry, reason: str, reply: Completion | None = None
    ) -> bool:
        """Dead-letter an entry on its own shard (see ``StreamStore.dead_letter``)."""
        return await self.stores[entry.shard].dead_letter(entry, reason, reply)

    async def refresh_lease(self, held: list[Held]) -> int:
        """Refresh the lease of every held entry, per shard; returns how many are lost."""
        by_shard = _group(held, lambda item: item[0])
        lost = 0
        for shard, items in by_shard.items():
            lost += await self.stores[shard].refresh_lease([(p, i) for _, p, i in items])
        return lost

    async def trim(self) -> int:
        """Trim every served shard's streams (see ``StreamStore.trim``)."""
        return sum([await store.trim() for store in self.stores.values()])

    async def forget_dead_consumers(self, idle_ms: int) -> list[str]:
        """Dead consumers removed on every served shard (see ``StreamStore``)."""
        removed: list[str] = []
        for store in self.stores.values():
            removed += await store.forget_dead_consumers(idle_ms)
        return removed

    async def forget_consumer_if_idle(self) -> bool:
        """Leave the group on every served shard where this consumer holds nothing."""
        forgotten = [await store.forget_consumer_if_idle() for store in self.stores.values()]
        return all(forgotten)

    async def queue_stats(self) -> list[QueueStats]:
        """Queue stats of every served shard, shard by shard, highest priority first."""
        stats: list[QueueStats] = []
        for store in self.stores.values():
            stats += await store.queue_stats()
        return stats

    async def aclose(self) -> None:
        """Close the per-primary clients of a cluster (the main client is the caller's)."""
        if self.cluster_writes is not None:
            await self.cluster_writes.nodes.reset()

    async def redis_time_ms(self) -> float:
        """The Redis server's clock, in ms since the epoch."""
        return await next(iter(self.stores.values())).redis_time_ms()


def serving_plan(keys: wire.KeySpace, shards: tuple[int, ...]) -> dict[int, wire.KeySpace]:
    """Shard id -> its key space, for the served ``shards``; plus the v1 streams
    (``UNSHARDED``) when the fleet is sharded and shard 0 is among them."""
    plan = {shard: keys.for_shard(shard) for shard in shards}
    if keys.shards > 1 and 0 in shards:
        plan[UNSHARDED] = replace(keys, shards=1, shard=0)
    return plan


def shard_label(shard: int) -> str:
    """How a shard id is shown: its number, or ``v1`` for the unsharded streams."""
    return "v1" if shard == UNSHARDED else str(shard)


def _group(items: list[Any], shard_of: Any) -> dict[int, list[Any]]:
    grouped: dict[int, list[Any]] = defaultdict(list)
    for item in items:
        grouped[shard_of(item)].append(item)
    return grouped
