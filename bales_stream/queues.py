"""Queue statistics, read-only: how deep each request stream is for a consumer group (length,
lag, pending, consumers, the oldest waiting request's age). Used by the sidecar's /health,
the metrics and ``bales-stream info``; it needs no consumer name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from bales_producer import wire

from .protocol import entry_time_ms


@dataclass(frozen=True)
class QueueStats:
    """Depth of one priority stream as the consumer group sees it."""

    priority: int
    length: int
    lag: int | None
    """Entries not yet delivered to the group (None when Redis cannot tell)."""
    pending: int
    """Entries delivered but not yet acked."""
    consumers: int = 0
    """Consumers the group knows on this stream."""
    oldest_age_s: float | None = None
    """How long the oldest unanswered request has waited (None: nothing waits)."""
    shard: int = 0


async def queue_stats(
    redis: aioredis.Redis, keys: wire.KeySpace, group: str, shard: int
) -> list[QueueStats]:
    """Length, lag, pending, consumers and the oldest waiting request's age of every
    priority stream of ``keys`` for ``group`` (two pipelined round trips and Redis's clock);
    ``shard`` labels the figures."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in keys.streams:
            pipe.xlen(stream)
            pipe.xinfo_groups(stream)
        results = await pipe.execute(raise_on_error=False)
    groups = [_find_group(results[2 * p + 1], group) for p in range(keys.priority_levels)]
    oldest_ms, now_ms = await _oldest_waiting_ms(redis, keys.streams, group, groups)
    stats = []
    for priority, found in enumerate(groups):
        length = results[2 * priority]
        oldest = oldest_ms[priority]
        stats.append(
            QueueStats(
                priority,
                int(length) if isinstance(length, int) else 0,
                found.get("lag") if found else None,
                int(found.get("pending", 0)) if found else 0,
                int(found.get("consumers", 0)) if found else 0,
                None if oldest is None else max(0.0, now_ms - oldest) / 1000,
                shard,
            )
        )
    return stats


async def _oldest_waiting_ms(
    redis: aioredis.Redis, streams: list[str], group: str, groups: list[dict[str, Any] | None]
) -> tuple[list[int | None], float]:
    """Per stream, the enqueue time (entry ID ms) of the oldest unanswered request: the
    oldest pending entry, else the first not yet delivered; and Redis's clock now."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream, found in zip(streams, groups, strict=True):
            if found is not None and int(found.get("pending", 0)):
                pipe.xpending(stream, group)
            else:
                after = _text(found.get("last-delivered-id")) if found else "0-0"
                pipe.xrange(stream, min=f"({after}", count=1)
        answers = await pipe.execute(raise_on_error=False)
    seconds, micros = await redis.time()  # not in the pipeline: Redis Cluster refuses
    oldest: list[int | None] = []
    for answer in answers:
        if isinstance(answer, dict):
            first = answer.get("min")
        elif isinstance(answer, list) and answer:
            first = answer[0][0]
        else:
            first = None
        oldest.append(None if first is None else entry_time_ms(_text(first)))
    return oldest, seconds * 1000 + micros / 1000


def _find_group(groups: object, group: str) -> dict[str, Any] | None:
    """``group``'s entry in an XINFO GROUPS answer (None: no such stream or group)."""
    if not isinstance(groups, list):
        return None
    for found in groups:
        name = found.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return dict(found)
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
