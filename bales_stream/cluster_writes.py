"""Writing replies, acks and dead letters on a Redis Cluster, chosen once per consumer (a
single node needs none of this: one fenced script call per batch, in ``streams``).

On a cluster, reply keys hash to any slot, so one script cannot write a batch's replies and
ack its entries. ``ClusterWrites`` writes every reply once, in one call per primary for the
replies whose slots it owns (``scripts.REPLIES_ON_NODE_LUA``, ``cluster_nodes``), then in one
pipeline pushes the inboxes and acks each shard's entries still owned (fenced by
``scripts.ACK_OWNED_LUA``). A dead letter is its reply first, then one script on the shard's
hash slot that records and acks the entry.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from bales_producer import wire
from redis.exceptions import RedisError

from . import scripts
from .cluster_nodes import NodeClients
from .replies import Completed, Completion

log = logging.getLogger(__name__)


class Shard(Protocol):
    """What the cluster writes need of one shard's stream store."""

    redis: Any
    keys: wire.KeySpace
    group: str
    consumer: str
    reply_ttl_s: int


class ClusterWrites:
    """Replies, acks and dead letters of one consumer's shards on a Redis Cluster."""

    def __init__(self, nodes: NodeClients) -> None:
        self.nodes = nodes

    async def complete(self, parts: list[tuple[Shard, list[Completion]]]) -> Completed:
        """Complete the entries of one or more shards in two steps in all: every reply, each
        written once (``write_replies``); then one pipeline with every inbox push and each
        shard's fenced ack."""
        first = parts[0][0]
        everything = [done for _, part in parts for done in part]
        bad_reply_keys = await self.write_replies(first, everything)
        async with first.redis.pipeline() as pipe:
            # Every inbox is notified, even when its reply key was already written: after a
            # fault this call is retried whole, and the first attempt may have written the
            # reply but not reached the inbox. A client may so see a reply twice; it keeps
            # the first (the reply key holds exactly one).
            inboxes = push_inboxes(pipe, everything, first.reply_ttl_s)
            for shard, part in parts:
                _queue_fenced_ack(pipe, shard, part)
            results = await pipe.execute()
        return Completed(
            stale=sum(int(stale) for stale in results[inboxes:]),
            bad_reply_keys=bad_reply_keys,
            bad_inboxes=sum(1 for pushed in results[:inboxes] if not int(pushed)),
        )

    async def write_replies(self, shard: Shard, completions: list[Completion]) -> int:
        """Each reply once, in one call per primary for the replies whose slots it owns
        (``scripts.REPLIES_ON_NODE_LUA``, ``cluster_nodes``); after any Redis error, again
        through the cluster client, which follows MOVED/ASK and failovers (harmless: a reply
        is written once either way). Returns how many reply keys held another type."""
        if not completions:
            return 0
        reply_keys = [shard.keys.reply(done.request_id) for done in completions]
        groups = self.nodes.group_by_node(reply_keys)
        outcomes = await asyncio.gather(
            *(
                self._write_replies_on_node(shard.reply_ttl_s, n, i, reply_keys, completions)
                for n, i in groups.items()
            ),
            return_exceptions=True,
        )
        errors = [e for e in outcomes if isinstance(e, BaseException)]
        if not errors:
            return sum(int(bad) for bad in outcomes if isinstance(bad, int))
        if not all(isinstance(e, RedisError) for e in errors):
            raise errors[0]
        log.info("writing replies per primary failed (%s); using the cluster client", errors[0])
        await self.nodes.reset()
        async with shard.redis.pipeline() as pipe:
            for reply_key, done in zip(reply_keys, completions, strict=True):
                pipe.eval(scripts.REPLY_ONCE_LUA, 1, reply_key, done.document, shard.reply_ttl_s)
            written = await pipe.execute()
        return sum(1 for outcome in written if int(outcome) < 0)

    async def _write_replies_on_node(
        self,
        ttl_s: int,
        node: str,
        indexes: list[int],
        reply_keys: list[str],
        completions: list[Completion],
    ) -> int:
        client = await self.nodes.client(node, [scripts.REPLIES_ON_NODE_LUA])
        pairs: list[Any] = []
        for i in indexes:
            pairs += [reply_keys[i], completions[i].document]
        return int(await client.evalsha(scripts.REPLIES_ON_NODE_SHA, 0, ttl_s, *pairs))

    async def dead_letter(
        self,
        shard: Shard,
        priority: int,
        entry_id: str,
        record: dict[Any, Any],
        reply: Completion | None,
        maxlen: int,
    ) -> bool:
        """The reply first (written once), then its inbox push and, in one script on the
        shard's hash slot, the dead-letter record (capped at ``maxlen``) and the ack."""
        replies = [] if reply is None else [reply]
        await self.write_replies(shard, replies)
        pairs = [item for field in record.items() for item in field]
        async with shard.redis.pipeline() as pipe:
            push_inboxes(pipe, replies, shard.reply_ttl_s)  # see complete
            pipe.eval(
                scripts.DEAD_LETTER_LUA,
                2,
                shard.keys.dead_letter,
                shard.keys.stream(priority),
                maxlen,
                entry_id,
                shard.group,
                *pairs,
            )
            results = await pipe.execute()
        return bool(int(results[-1]))


def _queue_fenced_ack(pipe: Any, shard: Shard, completions: list[Completion]) -> None:
    """Add to a cluster pipeline the ack of these entries, only those still ``shard``'s
    consumer's (``scripts.ACK_OWNED_LUA``; its answer is how many were stale)."""
    streams = [shard.keys.stream(done.priority) for done in completions]
    ids = [done.entry_id for done in completions]
    pipe.eval(scripts.ACK_OWNED_LUA, len(streams), *streams, shard.group, shard.consumer, *ids)


def push_inboxes(pipe: Any, completions: list[Completion], ttl_s: int) -> int:
    """Queue on a pipeline the replies of each ``reply_to`` inbox, one push per inbox (not
    per reply), in completion order, each refreshing its TTL and skipping an inbox of another
    type (``scripts.PUSH_INBOX_LUA``). Returns how many calls were queued."""
    inboxes: dict[str, list[bytes]] = {}
    for done in completions:
        if done.reply_to:
            inboxes.setdefault(done.reply_to, []).append(done.document)
    for inbox, documents in inboxes.items():
        pipe.eval(scripts.PUSH_INBOX_LUA, 1, inbox, ttl_s, *documents)
    return len(inboxes)
