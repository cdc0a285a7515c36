"""Redis Streams access for one consumer: group set-up, reads, fenced completion, dead letters.

All Redis commands the consume loop issues live here, so the loop itself reads as plain
steps. Completion (write the reply, then ack) is one Lua script per batch: atomic, one
round trip, and fenced: an entry is answered only while it is still pending for this
consumer, so a stale owner's late write is dropped (and counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from bales_producer import wire
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .cluster_nodes import NodeClients
from .protocol import entry_time_ms
from .replies import Completion

log = logging.getLogger(__name__)

DEAD_LETTER_MAXLEN = 100_000
"""Approximate cap of the dead-letter stream (it is not a request stream, so trimming loses
no accepted request; it only forgets the oldest diagnostics)."""

# KEYS, per completed entry i: stream, reply key, inbox key (the reply key again if none).
# ARGV: group, consumer, ttl_s, then per entry: entry id, document, "1" if the inbox is used.
_COMPLETE_LUA = """
local group, consumer, ttl = ARGV[1], ARGV[2], ARGV[3]
local stale = 0
for i = 1, #KEYS / 3 do
  local stream, reply, inbox = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local id, doc, notify = ARGV[3 * i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3]
  local owned = redis.call('XPENDING', stream, group, id, id, 1, consumer)
  if #owned == 1 then
    if redis.call('EXISTS', reply) == 0 then
      redis.call('RPUSH', reply, doc)
      redis.call('EXPIRE', reply, ttl)
      if notify == '1' then
        redis.call('RPUSH', inbox, doc)
        redis.call('EXPIRE', inbox, ttl)
      end
    end
    redis.call('XACK', stream, group, id)
  else
    stale = stale + 1
  end
end
return stale
"""


# Redis Cluster: a reply key has its own hash slot, so one script cannot write it and ack its
# entry. There, replies are written first, each at most once (_REPLY_ONCE_LUA, sent with EVAL:
# cluster pipelines refuse EVALSHA), then each entry is acked only if still pending for this
# consumer (_ACK_OWNED_LUA: the request streams share one hash tag). Nothing is lost (a reply
# precedes its ack), and a reply is still written once; what is weaker than on one node is
# the fence: a stale owner's reply can land before the new owner's (both are answers to the
# same request; only the first is kept) and its ack is still refused and counted.
_REPLY_ONCE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# The fast path of the same, per primary: every reply whose key that primary owns, each
# written once, in one call. The reply keys come in ARGV, not KEYS: declared keys must share
# one slot, and each reply key has its own. The allow-cross-slot-keys flag (Redis 7) lets one
# script touch keys of several slots of its own node; a key the node does not own (a slot
# moved, a failover) is refused ("non local key") and the caller falls back to the cluster
# client, which follows the redirect. ARGV: ttl_s, then reply key, document pairs.
_REPLIES_ON_NODE_LUA = """#!lua flags=allow-cross-slot-keys
local ttl, written = ARGV[1], 0
for i = 2, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[i]) == 0 then
    redis.call('RPUSH', ARGV[i], ARGV[i + 1])
    redis.call('EXPIRE', ARGV[i], ttl)
    written = written + 1
  end
end
return written
"""
_REPLIES_ON_NODE_SHA = hashlib.sha1(_REPLIES_ON_NODE_LUA.encode()).hexdigest()

_ACK_OWNED_LUA = """
local group, consumer = ARGV[1], ARGV[2]
local stale = 0
for i = 1, #KEYS do
  local id = ARGV[i + 2]
  if #redis.call('XPENDING', KEYS[i], group, id, id, 1, consumer) == 1 then
    redis.call('XACK', KEYS[i], group, id)
  else
    stale = stale + 1
  end
end
return stale
"""

# Cluster dead-lettering: KEYS dead stream, request stream; ARGV maxlen, entry id, group, then
# the record's field/value pairs. Both keys carry the queue's hash tag.
_DEAD_LETTER_LUA = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 4))
redis.call('XACK', KEYS[2], ARGV[3], ARGV[2])
return 1
"""


# Prioritised read: KEYS are the request streams, highest priority first.
# ARGV: group, consumer, count, share. Every lower level first gets up to `share` entries (so a
# flood of p0 cannot starve it), then the rest of `count` is filled strictly by priority.
_READ_LUA = """
local group, consumer = ARGV[1], ARGV[2]
local count, share = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, got = {}, 0
local function take(level, n)
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n,
                       'STREAMS', KEYS[level], '>')
  if r then
    out[#out + 1] = {level - 1, r[1][2]}
    got = got + #r[1][2]
  end
end
for level = 2, #KEYS do take(level, share) end
for level = 1, #KEYS do
  if got >= count then break end
  take(level, count - got)
end
return out
"""


# Lease refresh, fenced: KEYS[i] is the stream of entry ARGV[i + 2]. Resets the idle time of
# each entry still pending for this consumer (XCLAIM ... JUSTID does not count a delivery);
# never takes back an entry another consumer has claimed. Returns how many another consumer
# holds now (entries acked meanwhile are simply skipped).
_LEASE_LUA = """
local group, consumer = ARGV[1], ARGV[2]
local lost = 0
for i = 1, #KEYS do
  local id = ARGV[i + 2]
  local entry = redis.call('XPENDING', KEYS[i], group, id, id, 1)
  if #entry == 1 then
    if entry[1][2] == consumer then
      redis.call('XCLAIM', KEYS[i], group, consumer, 0, id, 'JUSTID')
    else
      lost = lost + 1
    end
  end
end
return lost
"""


# Forget this consumer only if it has no pending entry on any request stream.
_FORGET_LUA = """
for i = 1, #KEYS do
  if #redis.call('XPENDING', KEYS[i], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
end
for i = 1, #KEYS do redis.call('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], ARGV[2]) end
return 1
"""


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One entry read from a request stream (``fields`` is None for a deleted entry)."""

    priority: int
    entry_id: str
    fields: dict[bytes, bytes] | None
    shard: int = 0


@dataclass(frozen=True)
class Reclaimed:
    """What one XAUTOCLAIM call took over."""

    cursor: str
    entries: list[StreamEntry]
    deliveries: dict[str, int]
    """entry id -> times delivered (including this claim)."""


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


@contextlib.asynccontextmanager
async def bounded(seconds: float) -> AsyncIterator[None]:
    """Fail Redis work that takes longer than ``seconds`` with a redis ``TimeoutError``.

    The client runs without a socket timeout (redis-py's costs a third of the throughput of
    this loop, per PERF-NOTES); this bounds each step instead, so a stalled Redis or a
    silently dropped connection surfaces as an error the caller retries (the cancelled
    command's connection is discarded)."""
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


async def complete_on_cluster(parts: list[tuple[StreamStore, list[Completion]]]) -> int:
    """Complete the entries of one or more shards of a Redis Cluster in two steps in all:
    every reply, each written once (``StreamStore.write_replies_on_cluster``); then one
    pipeline with every inbox push and each shard's fenced ack. Returns how many entries were
    stale (not ours any more)."""
    first = parts[0][0]
    everything = [done for _, part in parts for done in part]
    await first.write_replies_on_cluster(everything)
    async with first.redis.pipeline() as pipe:
        # Every inbox is notified, even when its reply key was already written: after a
        # fault this call is retried whole, and the first attempt may have written the
        # reply but not reached the inbox. A client may so see a reply twice; it keeps
        # the first (the reply key holds exactly one).
        _push_inboxes(pipe, everything, first.reply_ttl_s)
        for store, part in parts:
            store.queue_fenced_ack(pipe, part)
        results = await pipe.execute()
    return sum(int(stale) for stale in results[-len(parts) :])


def _push_inboxes(pipe: Any, completions: list[Completion], ttl_s: int) -> None:
    """Queue on a pipeline the replies of each ``reply_to`` inbox, one RPUSH per inbox (not
    per reply), in completion order, and refresh its TTL."""
    inboxes: dict[str, list[bytes]] = {}
    for done in completions:
        if done.reply_to:
            inboxes.setdefault(done.reply_to, []).append(done.document)
    for inbox, documents in inboxes.items():
        pipe.rpush(inbox, *documents)
        pipe.expire(inbox, ttl_s)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    """A flat ``[field, value, ...]`` list (as Lua returns it) as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


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
        nodes: NodeClients | None = None,
        shard: int | None = None,
    ) -> None:
        """``nodes``: the per-primary clients of a cluster (shared by a consumer's shards);
        ``shard``: the id its entries carry (default ``keys.shard``)."""
        self.redis = redis
        self.cluster = cluster
        self.nodes = (nodes or NodeClients(redis)) if cluster else None
        self.keys = keys
        self.shard = keys.shard if shard is None else shard
        self.group = group
        self.consumer = consumer
        self.reply_ttl_s = reply_ttl_s
        self._priority_of = {key.encode(): p for p, key in enumerate(keys.streams)}
        self._complete = redis.register_script(_COMPLETE_LUA)
        self._read = redis.register_script(_READ_LUA)
        self._lease = redis.register_script(_LEASE_LUA)
        self._forget = redis.register_script(_FORGET_LUA)
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
        """Read new entries. While the streams have a backlog (the last read came back full),
        take up to ``count`` by the priority rule in one round trip (``_READ_LUA``); else,
        or when that finds nothing, block up to ``block_ms`` on every stream at once."""
        entries = await self._read_prioritised(count, share) if self._backlog else []
        if not entries:
            streams: dict[Any, Any] = dict.fromkeys(self.keys.streams, ">")
            blocked = await self.redis.xreadgroup(
                self.group, self.consumer, streams, count=count, block=block_ms
            )
            entries = self._entries(blocked)
        self._backlog = len(entries) >= count
        return entries

    async def _read_prioritised(self, count: int, share: int) -> list[StreamEntry]:
        response = await self._read(
            keys=self.keys.streams, args=[self.group, self.consumer, count, share]
        )
        return [
            StreamEntry(priority, entry_id.decode(), _pairs(flat), self.shard)
            for priority, items in response
            for entry_id, flat in items
        ]

    async def read_own_pending(self, after: dict[int, str], count: int) -> list[StreamEntry]:
        """Our own pending entries (delivered to us, never acked) after the given IDs, per
        priority; used once at start so a restarted consumer answers what it had taken."""
        streams: dict[Any, Any] = {
            self.keys.stream(p): after.get(p, "0") for p in range(self.keys.priority_levels)
        }
        response = await self.redis.xreadgroup(self.group, self.consumer, streams, count=count)
        return self._entries(response)

    def _entries(self, response: Any) -> list[StreamEntry]:
        entries = []
        for stream, items in response or []:
            priority = self._priority_of[stream]
            for entry_id, fields in items:
                entries.append(StreamEntry(priority, entry_id.decode(), fields or None, self.shard))
        return entries

    async def complete(self, completions: list[Completion]) -> int:
        """Write each reply (only if absent) and ack its entry, atomically, only for entries
        still pending for this consumer. Returns how many were stale (not ours any more)."""
        if not completions:
            return 0
        if self.cluster:  # replies first (each once), then the fenced acks
            return await complete_on_cluster([(self, completions)])
        keys, args = self._completion_call(completions)
        stale = await self._complete(keys=keys, args=args)
        return int(stale)

    def queue_fenced_ack(self, pipe: Any, completions: list[Completion]) -> None:
        """Add to a cluster pipeline the ack of these entries, only those still ours
        (``_ACK_OWNED_LUA``; its answer is how many were stale)."""
        streams = [self.keys.stream(done.priority) for done in completions]
        ids = [done.entry_id for done in completions]
        pipe.eval(_ACK_OWNED_LUA, len(streams), *streams, self.group, self.consumer, *ids)

    async def write_replies_on_cluster(self, completions: list[Completion]) -> None:
        """Each reply once, in one call per primary for the replies whose slots it owns
        (``_REPLIES_ON_NODE_LUA``, ``cluster_nodes``); after any Redis error, again through
        the cluster client, which follows MOVED/ASK and failovers (harmless: a reply is
        written once either way)."""
        if not completions:
            return
        reply_keys = [self.keys.reply(done.request_id) for done in completions]
        assert self.nodes is not None
        groups = self.nodes.group_by_node(reply_keys)
        outcomes = await asyncio.gather(
            *(
                self._write_replies_on_node(n, i, reply_keys, completions)
                for n, i in groups.items()
            ),
            return_exceptions=True,
        )
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        if not errors:
            return
        if not all(isinstance(e, RedisError) for e in errors):
            raise errors[0]
        log.info("writing replies per primary failed (%s); using the cluster client", errors[0])
        await self.nodes.reset()
        async with self.redis.pipeline() as pipe:
            for reply_key, done in zip(reply_keys, completions, strict=True):
                pipe.eval(_REPLY_ONCE_LUA, 1, reply_key, done.document, self.reply_ttl_s)
            await pipe.execute()

    async def _write_replies_on_node(
        self, node: str, indexes: list[int], reply_keys: list[str], completions: list[Completion]
    ) -> None:
        assert self.nodes is not None
        client = await self.nodes.client(node, [_REPLIES_ON_NODE_LUA])
        pairs: list[Any] = []
        for i in indexes:
            pairs += [reply_keys[i], completions[i].document]
        await client.evalsha(_REPLIES_ON_NODE_SHA, 0, self.reply_ttl_s, *pairs)

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
    ) -> None:
        """Move an entry to the dead-letter stream (with the reason) and ack it, in one
        transaction; with ``reply``, its client's error reply is written in the same step."""
        record: dict[Any, Any] = {
            "reason": reason,
            "stream": self.keys.stream(entry.priority),
            "entry_id": entry.entry_id,
        }
        for name, value in (entry.fields or {}).items():
            record[b"field:" + name] = value
        if self.cluster:
            await self._dead_letter_on_cluster(entry, record, reply)
            return
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.keys.dead_letter, record, maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            if reply is None:
                pipe.xack(self.keys.stream(entry.priority), self.group, entry.entry_id)
            else:
                keys, args = self._completion_call([reply])
                await self._complete(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def _dead_letter_on_cluster(
        self, entry: StreamEntry, record: dict[Any, Any], reply: Completion | None
    ) -> None:
        """The reply first (written once), then its inbox push and, in one script on the
        shard's hash slot, the dead-letter record and the ack."""
        replies = [] if reply is None else [reply]
        await self.write_replies_on_cluster(replies)
        pairs = [item for field in record.items() for item in field]
        stream = self.keys.stream(entry.priority)
        async with self.redis.pipeline() as pipe:
            _push_inboxes(pipe, replies, self.reply_ttl_s)  # see complete_on_cluster
            pipe.eval(
                _DEAD_LETTER_LUA,
                2,
                self.keys.dead_letter,
                stream,
                DEAD_LETTER_MAXLEN,
                entry.entry_id,
                self.group,
                *pairs,
            )
            await pipe.execute()

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
        ``cursor``; entries deleted meanwhile are dropped from the pending list by Redis."""
        stream = self.keys.stream(priority)
        next_cursor, items, *_ = await self.redis.xautoclaim(
            stream, self.group, self.consumer, min_idle_ms, cursor, count=count
        )
        entries = [StreamEntry(priority, i.decode(), f or None, self.shard) for i, f in items if i]
        deliveries: dict[str, int] = {}
        if entries:  # exactly these entries' counts (a range query would drag in the rest)
            async with self.redis.pipeline(transaction=False) as pipe:
                for entry in entries:
                    pipe.xpending_range(stream, self.group, entry.entry_id, entry.entry_id, 1)
                for found in await pipe.execute():
                    for p in found:
                        deliveries[_text(p["message_id"])] = int(p["times_delivered"])
        return Reclaimed(next_cursor.decode(), entries, deliveries)

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
                ms, seq = _parse_id(group["last-delivered-id"])
                needed.append((ms, seq + 1))
        ms, seq = min(needed)
        return f"{ms}-{seq}"

    async def forget_consumer_if_idle(self) -> bool:
        """Remove this consumer from the group, atomically, only if it holds no pending entry
        on any stream (after a clean stop), so consumer names do not pile up."""
        return bool(await self._forget(keys=self.keys.streams, args=[self.group, self.consumer]))

    async def queue_stats(self) -> list[QueueStats]:
        """Length, lag, pending, consumers and the oldest waiting request's age of every
        priority stream for our group (two pipelined round trips)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream in self.keys.streams:
                pipe.xlen(stream)
                pipe.xinfo_groups(stream)
            results = await pipe.execute(raise_on_error=False)
        groups = [self._find_group(results[2 * p + 1]) for p in range(self.keys.priority_levels)]
        oldest_ms, now_ms = await self._oldest_waiting_ms(groups)
        stats = []
        for priority, group in enumerate(groups):
            length = results[2 * priority]
            oldest = oldest_ms[priority]
            stats.append(
                QueueStats(
                    priority,
                    int(length) if isinstance(length, int) else 0,
                    group.get("lag") if group else None,
                    int(group.get("pending", 0)) if group else 0,
                    int(group.get("consumers", 0)) if group else 0,
                    None if oldest is None else max(0.0, now_ms - oldest) / 1000,
                    self.shard,
                )
            )
        return stats

    async def _oldest_waiting_ms(
        self, groups: list[dict[str, Any] | None]
    ) -> tuple[list[int | None], float]:
        """Per stream, the enqueue time (entry ID ms) of the oldest unanswered request: the
        oldest pending entry, else the first not yet delivered; and Redis's clock now."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, group in zip(self.keys.streams, groups, strict=True):
                if group is not None and int(group.get("pending", 0)):
                    pipe.xpending(stream, self.group)
                else:
                    after = _text(group.get("last-delivered-id")) if group else "0-0"
                    pipe.xrange(stream, min=f"({after}", count=1)
            answers = await pipe.execute(raise_on_error=False)
        seconds, micros = await self.redis.time()  # not in the pipeline: Redis Cluster refuses
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

    def _find_group(self, groups: object) -> dict[str, Any] | None:
        if not isinstance(groups, list):
            return None
        for group in groups:
            name = group.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                return group
        return None

    async def redis_time_ms(self) -> float:
        """The Redis server's clock, in ms since the epoch."""
        seconds, micros = await self.redis.time()
        return seconds * 1000 + micros / 1000
