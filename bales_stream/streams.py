"""Redis Streams access for one consumer: group set-up, reads, fenced completion, dead letters.

All Redis commands the consume loop issues live here, so the loop itself reads as plain
steps. Completion (write the reply, then ack) is one Lua script per batch: atomic, one
round trip, and fenced: an entry is answered only while it is still pending for this
consumer, so a stale owner's late write is dropped (and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from bales_producer import wire
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import scripts
from .cluster_nodes import NodeClients
from .cluster_writes import ClusterWrites
from .protocol import MAX_FIELD_BYTES, MAX_FIELD_NAME_BYTES, MAX_FIELDS
from .queues import QueueStats, queue_stats
from .replies import Completed, Completion

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 100_000
"""Approximate cap of the dead-letter stream (it is not a request stream, so trimming loses
no accepted request; it only forgets the oldest diagnostics)."""


class StreamEntry(NamedTuple):
    """One entry read from a request stream (``fields`` is None for a deleted entry).

    ``withheld``: fields too large (or too many) to be read, by name, with their size in
    bytes; their values never reach the consumer (see ``scripts``)."""

    priority: int
    entry_id: str
    fields: dict[bytes, bytes] | None
    shard: int = 0
    withheld: dict[bytes, int] | None = None


PERMANENT_ERRORS = ("WRONGTYPE", "ERR", "NOPERM", "NOSCRIPT")
"""Prefixes of Redis errors that retrying the same command cannot cure (a key of another
type, a script error, a missing permission). Others (LOADING, BUSY, READONLY, OOM,
MASTERDOWN, TRYAGAIN, CLUSTERDOWN, NOGROUP, connection errors, timeouts) may go away."""


def is_permanent(exc: RedisError) -> bool:
    """True when retrying the command that raised ``exc`` is pointless."""
    return isinstance(exc, ResponseError) and str(exc).startswith(PERMANENT_ERRORS)


def bound_fields(
    fields: dict[bytes, bytes], max_input_bytes: int
) -> tuple[dict[bytes, bytes], dict[bytes, int] | None]:
    """The Python twin of ``scripts._BOUND``, for entries the blocking read brought whole:
    (kept fields, withheld name -> size)."""
    kept: dict[bytes, bytes] = {}
    withheld: dict[bytes, int] = {}
    for name, value in fields.items():
        limit = max_input_bytes if name == b"input" else MAX_FIELD_BYTES
        if len(name) > MAX_FIELD_NAME_BYTES or len(value) > limit or len(kept) >= MAX_FIELDS:
            withheld[name[:MAX_FIELD_NAME_BYTES]] = len(value)
        else:
            kept[name] = value
    return kept, withheld or None


@dataclass(frozen=True)
class Reclaimed:
    """What one XAUTOCLAIM call took over."""

    cursor: str
    entries: list[StreamEntry]
    deliveries: dict[str, int]
    """entry id -> times delivered (including this claim)."""


@contextlib.asynccontextmanager
async def bounded(seconds: float) -> AsyncIterator[None]:
    """Fail Redis work that takes longer than ``seconds`` with a redis ``TimeoutError``.

    The client runs without a socket timeout (redis-py's costs a third of the throughput of
    this loop, as measured on the project machines); this bounds each step instead, so a
    stalled Redis or a silently dropped connection surfaces as an error the caller retries
    (the cancelled command's connection is discarded)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise RedisTimeoutError(f"Redis did not answer within {seconds:.1f} s") from None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(entry_id).partition("-")
    return int(ms), int(seq or 0)


_MAX_ID_PART = 2**64 - 1


def _after(ms: int, seq: int) -> tuple[int, int]:
    """The entry ID right after ``ms-seq`` (a client may XADD the largest ID there is: then
    nothing comes after it, and it is kept)."""
    if seq < _MAX_ID_PART:
        return ms, seq + 1
    if ms < _MAX_ID_PART:
        return ms + 1, 0
    return ms, seq


def _pairs(flat: list[Any]) -> dict[Any, Any]:
    """A flat ``[name, value, ...]`` list (as Lua returns it) as a dict (a name given twice:
    the last value counts, as with redis-py's own XREADGROUP parsing)."""
    items = iter(flat)
    return dict(zip(items, items, strict=True))


class StreamStore:
    """The request streams of one shard of a key space, seen by one consumer of one group
    (``keys.shard`` says which shard; see ``shards.ShardedStreams`` for all of them)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: wire.KeySpace,
        group: str,
        consumer: str,
        reply_ttl_s: int,
        cluster: bool = False,
        cluster_writes: ClusterWrites | None = None,
        shard: int | None = None,
        max_input_bytes: int = 1_048_576,
    ) -> None:
        """``cluster``: the client is a Redis Cluster client, and writes go through
        ``cluster_writes`` (given: shared by a consumer's shards; else made here);
        ``shard``: the id its entries carry (default ``keys.shard``); ``max_input_bytes``:
        the largest ``input`` a read transfers (larger ones are withheld)."""
        self.redis = redis
        if cluster and cluster_writes is None:
            cluster_writes = ClusterWrites(NodeClients(redis))
        self.cluster_writes = cluster_writes
        """How replies, acks and dead letters are written on a cluster (None: one node),
        chosen once here."""
        self.keys = keys
        self.shard = keys.shard if shard is None else shard
        self.group = group
        self.consumer = consumer
        self.reply_ttl_s = reply_ttl_s
        self.max_input_bytes = max_input_bytes
        self._limits = [max_input_bytes, MAX_FIELD_BYTES, MAX_FIELDS, MAX_FIELD_NAME_BYTES]
        self._priority_of = {key.encode(): p for p, key in enumerate(keys.streams)}
        self._complete = redis.register_script(scripts.COMPLETE_LUA)
        self._read = redis.register_script(scripts.READ_LUA)
        self._read_own = redis.register_script(scripts.READ_OWN_PENDING_LUA)
        self._reclaim = redis.register_script(scripts.RECLAIM_LUA)
        self._lease = redis.register_script(scripts.LEASE_LUA)
        self._forget = redis.register_script(scripts.FORGET_LUA)
        self._backlog = True  # start with the prioritised read: there may be a backlog

    async def ensure_groups(self) -> None:
        """Create the consumer group on every priority stream (MKSTREAM) unless it exists."""
        for stream in self.keys.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if not str(exc).startswith("BUSYGROUP"):
                    raise

    async def read(self, count: int, share: int, block_ms: int) -> list[StreamEntry]:
        """Read new entries. While the streams may have a backlog, take up to ``count`` by
        the priority rule in one round trip, sizes checked in Redis (``scripts.READ_LUA``);
        when that finds nothing, block up to ``block_ms`` on every stream at once for ONE
        entry (a blocking read cannot run in a script, so it transfers its entry whole: one,
        not ``count``), then go back to the bounded read for whatever else has arrived."""
        entries = await self._read_prioritised(count, share) if self._backlog else []
        if entries:
            self._backlog = len(entries) >= count
            return entries
        streams: dict[Any, Any] = dict.fromkeys(self.keys.streams, ">")
        blocked = await self.redis.xreadgroup(
            self.group, self.consumer, streams, count=1, block=block_ms
        )
        entries = self._bounded_entries(blocked)
        self._backlog = bool(entries)
        return entries

    async def _read_prioritised(self, count: int, share: int) -> list[StreamEntry]:
        response = await self._read(
            keys=self.keys.streams, args=[*self._limits, self.group, self.consumer, count, share]
        )
        return self._from_script(response)

    def _from_script(self, response: Any) -> list[StreamEntry]:
        """Entries as the read scripts return them: ``{{level, {{id, kept, withheld}}}}``."""
        return [self._entry(priority, raw) for priority, items in response or [] for raw in items]

    def _entry(self, priority: int, raw: list[Any]) -> StreamEntry:
        entry_id, kept, withheld = raw
        return StreamEntry(
            priority,
            _text(entry_id),
            None if kept is None else _pairs(kept),
            self.shard,
            _pairs(withheld) or None,
        )

    async def read_own_pending(self, after: dict[int, str], count: int) -> list[StreamEntry]:
        """Our own pending entries (delivered to us, never acked) after the given IDs, per
        priority, sizes checked in Redis; used when a read loop starts, so a restarted
        consumer answers what it had taken."""
        afters = [after.get(p, "0") for p in range(self.keys.priority_levels)]
        response = await self._read_own(
            keys=self.keys.streams, args=[*self._limits, self.group, self.consumer, count, *afters]
        )
        return self._from_script(response)

    def _bounded_entries(self, response: Any) -> list[StreamEntry]:
        """Entries of a plain XREADGROUP reply, bounded as the scripts bound them."""
        entries = []
        for stream, items in response or []:
            priority = self._priority_of[stream]
            for entry_id, fields in items:
                kept, withheld = bound_fields(fields or {}, self.max_input_bytes)
                entries.append(
                    StreamEntry(priority, _text(entry_id), kept or None, self.shard, withheld)
                )
        return entries

    async def complete(self, completions: list[Completion]) -> Completed:
        """Write each reply (only if its key is empty) and ack its entry, atomically, only
        for entries still pending for this consumer (``scripts.COMPLETE_LUA``)."""
        if not completions:
            return Completed()
        if self.cluster_writes is not None:  # replies first (each once), then fenced acks
            return await self.cluster_writes.complete([(self, completions)])
        keys, args = self._completion_call(completions)
        stale, bad_reply_keys, bad_inboxes = await self._complete(keys=keys, args=args)
        return Completed(int(stale), int(bad_reply_keys), int(bad_inboxes))

    def _completion_call(self, completions: list[Completion]) -> tuple[list[str], list[Any]]:
        keys: list[str] = []
        args: list[Any] = [self.group, self.consumer, self.reply_ttl_s]
        for done in completions:
            reply_key = self.keys.reply(done.request_id)
            keys += [self.keys.stream(done.priority), reply_key, done.reply_to or reply_key]
            args += [done.entry_id, done.document, "1" if done.reply_to else "0"]
        return keys, args

    async def dead_letter(
        self, entry: StreamEntry, reason: str, reply: Completion | None = None
    ) -> bool:
        """Move an entry to the dead-letter stream (with the reason) and ack it, in one
        transaction; with ``reply``, its client's error reply is written in the same step.
        The record is bounded: the fields as read (withheld ones as ``size:<name>``, their
        size in bytes). Returns False when the dead-letter stream could not take the record
        (a key of another type): the entry is acked all the same, never retried forever."""
        record: dict[Any, Any] = {
            "reason": reason,
            "stream": self.keys.stream(entry.priority),
            "entry_id": entry.entry_id,
        }
        for name, value in (entry.fields or {}).items():
            record[b"field:" + name] = value
        for name, size in (entry.withheld or {}).items():
            record[b"size:" + name] = size
        if self.cluster_writes is not None:
            return await self.cluster_writes.dead_letter(
                self, entry.priority, entry.entry_id, record, reply, DEAD_LETTER_MAXLEN
            )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead_letter, record, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            if reply is None:
                pipe.xack(self.keys.stream(entry.priority), self.group, entry.entry_id)
            else:
                keys, args = self._completion_call([reply])
                await self._complete(keys=keys, args=args, client=pipe)
            added, acked = await pipe.execute(raise_on_error=False)
        if isinstance(acked, Exception):
            raise acked
        return not isinstance(added, Exception)

    async def refresh_lease(self, held: list[tuple[int, str]]) -> int:
        """Reset the idle time of entries we hold (priority, entry id) so no other consumer
        reclaims them while they wait or run. Returns how many are no longer ours."""
        if not held:
            return 0
        keys = [self.keys.stream(priority) for priority, _ in held]
        lost = await self._lease(
            keys=keys, args=[self.group, self.consumer, *(entry_id for _, entry_id in held)]
        )
        return int(lost)

    async def reclaim(self, priority: int, cursor: str, min_idle_ms: int, count: int) -> Reclaimed:
        """XAUTOCLAIM entries idle for ``min_idle_ms`` (a dead or stuck consumer's) from
        ``cursor``, sizes checked in Redis, with each one's delivery count
        (``scripts.RECLAIM_LUA``); entries deleted meanwhile are dropped by Redis."""
        next_cursor, items, deliveries = await self._reclaim(
            keys=[self.keys.stream(priority)],
            args=[*self._limits, self.group, self.consumer, min_idle_ms, cursor, count],
        )
        entries = [self._entry(priority, raw) for raw in items if raw[0]]
        counts = {_text(i): int(n) for i, n in _pairs(deliveries).items()}
        return Reclaimed(_text(next_cursor), entries, counts)

    async def trim(self) -> int:
        """XTRIM MINID every request stream below what any group still needs (its oldest
        pending entry, or what it has not read yet). Never loses an accepted request."""
        trimmed = 0
        for stream in self.keys.streams:
            min_id = await self._needed_from(stream)
            if min_id is not None:
                trimmed += await self.redis.xtrim(stream, minid=min_id, approximate=False)
        return trimmed

    async def _needed_from(self, stream: str) -> str | None:
        try:
            groups = await self.redis.xinfo_groups(stream)
        except ResponseError:
            return None  # no such stream yet
        if not groups:
            return None
        needed = []
        for group in groups:
            summary = await self.redis.xpending(stream, group["name"]) if group["pending"] else {}
            if summary.get("min"):
                needed.append(_parse_id(summary["min"]))
            else:  # nothing pending (or all acked since XINFO): keep only what is not yet read
                needed.append(_after(*_parse_id(group["last-delivered-id"])))
        ms, seq = min(needed)
        return f"{ms}-{seq}"

    async def forget_dead_consumers(self, idle_ms: int) -> list[str]:
        """Remove from the group every other consumer idle more than ``idle_ms`` on each
        request stream and holding no pending entry (a SIGKILLed consumer that nobody will
        restart under its name): the group's consumer count is then the live ones. The
        pending check and the removal are one script (``scripts.FORGET_LUA``), so an entry
        delivered meanwhile is never dropped with its consumer."""
        idle: dict[str, int] = {}
        for stream in self.keys.streams:
            try:
                consumers = await self.redis.xinfo_consumers(stream, self.group)
            except ResponseError:
                continue  # no stream or no group yet
            for consumer in consumers:
                name = consumer["name"]
                name = name.decode() if isinstance(name, bytes) else name
                idle[name] = min(idle.get(name, consumer["idle"]), consumer["idle"])
        dead = [name for name, ms in idle.items() if ms > idle_ms and name != self.consumer]
        return [
            name
            for name in dead
            if await self._forget(keys=self.keys.streams, args=[self.group, name])
        ]

    async def forget_consumer_if_idle(self) -> bool:
        """Remove this consumer from the group, atomically, only if it holds no pending entry
        on any stream (after a clean stop), so consumer names do not pile up."""
        return bool(await self._forget(keys=self.keys.streams, args=[self.group, self.consumer]))

    async def queue_stats(self) -> list[QueueStats]:
        """This shard's queue statistics for our group (see ``queues.queue_stats``)."""
        return await queue_stats(self.redis, self.keys, self.group, self.shard)

    async def redis_time_ms(self) -> float:
        """The Redis server's clock, in ms since the epoch."""
        seconds, micros = await self.redis.time()
        return seconds * 1000 + micros / 1000
