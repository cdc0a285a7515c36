"""Redis access: group creation, the prioritised read, fenced completion, dead letters."""

from __future__ import annotations

import json
import time

import pytest
import redis.asyncio as aioredis
from bales_producer import KeySpace
from redis.exceptions import ResponseError

from bales_stream.replies import Completion
from bales_stream.streams import StreamStore


@pytest.fixture
async def store(aredis: aioredis.Redis, keys: KeySpace) -> StreamStore:
    store = StreamStore(aredis, keys, "bales", "me", reply_ttl_s=60)
    await store.ensure_groups()
    return store


async def fill(aredis: aioredis.Redis, keys: KeySpace, priority: int, count: int) -> None:
    async with aredis.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.xadd(keys.stream(priority), {"request_id": f"p{priority}-{i}"})
        await pipe.execute()


def completion(priority: int, entry_id: str, request_id: str, reply_to: str | None = None):
    document = json.dumps({"request_id": request_id, "status": "ok"}).encode()
    return Completion(priority, entry_id, request_id, document, reply_to)


async def test_ensure_groups_is_idempotent_and_only_tolerates_busygroup(store, aredis, keys):
    await store.ensure_groups()
    groups = await aredis.xinfo_groups(keys.stream(2))
    assert [g["name"] for g in groups] == [b"bales"]
    bad = StreamStore(aredis, KeySpace(keys.prefix + "x", "q", 1), "bales", "me", 60)
    await aredis.set(bad.keys.stream(0), "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await bad.ensure_groups()


async def test_a_read_fills_by_priority_after_the_lower_share(store, aredis, keys):
    await fill(aredis, keys, 2, 100)
    await fill(aredis, keys, 0, 100)
    entries = await store.read(count=32, share=4, block_ms=100)
    by_priority = [sum(e.priority == p for e in entries) for p in range(3)]
    assert by_priority == [28, 0, 4]
    assert len(await store.read(count=32, share=4, block_ms=100)) == 32


async def test_an_idle_read_blocks_then_returns_nothing(store):
    assert await store.read(count=32, share=4, block_ms=50) == []


async def test_completion_writes_once_and_acks(store, aredis, keys):
    await fill(aredis, keys, 1, 1)
    [entry] = await store.read(count=8, share=1, block_ms=100)
    done = completion(1, entry.entry_id, "p1-0", reply_to=keys.inbox("me"))
    assert (await store.complete([done])).stale == 0
    assert await aredis.lrange(keys.reply("p1-0"), 0, -1) == [done.document]
    assert await aredis.lrange(keys.inbox("me"), 0, -1) == [done.document]
    assert 0 < await aredis.ttl(keys.inbox("me")) <= 60
    assert (await aredis.xpending(keys.stream(1), "bales"))["pending"] == 0
    # a second completion of the same entry is stale (no longer pending): nothing written
    assert (await store.complete([done])).stale == 1
    assert await aredis.llen(keys.reply("p1-0")) == 1


async def test_a_stale_owner_cannot_answer_an_entry_claimed_by_another(store, aredis, keys):
    await fill(aredis, keys, 0, 1)
    [entry] = await store.read(count=8, share=1, block_ms=100)
    await aredis.xclaim(keys.stream(0), "bales", "thief", 0, [entry.entry_id])
    assert (await store.complete([completion(0, entry.entry_id, "p0-0")])).stale == 1
    assert await aredis.exists(keys.reply("p0-0")) == 0
    assert (await aredis.xpending(keys.stream(0), "bales"))["pending"] == 1


async def test_an_existing_reply_is_not_overwritten(store, aredis, keys):
    await fill(aredis, keys, 0, 1)
    [entry] = await store.read(count=8, share=1, block_ms=100)
    await aredis.rpush(keys.reply("p0-0"), b"first")
    assert (await store.complete([completion(0, entry.entry_id, "p0-0")])).stale == 0
    assert await aredis.lrange(keys.reply("p0-0"), 0, -1) == [b"first"]
    assert (await aredis.xpending(keys.stream(0), "bales"))["pending"] == 0


async def test_queue_stats_report_length_lag_and_pending(store, aredis, keys):
    await fill(aredis, keys, 2, 10)
    await store.read(count=3, share=3, block_ms=100)
    stats = await store.queue_stats()
    assert (stats[2].length, stats[2].lag, stats[2].pending) == (10, 7, 3)
    assert (stats[0].length, stats[0].pending) == (0, 0)


async def test_queue_stats_report_the_age_of_the_oldest_unanswered_request(store, aredis, keys):
    now_ms = int(time.time() * 1000)
    for age_ms, stream in ((60_000, 1), (30_000, 1), (5_000, 2)):
        await aredis.xadd(keys.stream(stream), {"request_id": "x"}, id=f"{now_ms - age_ms}-0")
    stats = await store.queue_stats()
    assert stats[0].oldest_age_s is None  # nothing waits
    assert stats[1].oldest_age_s == pytest.approx(60, abs=5)  # the first undelivered
    assert stats[2].oldest_age_s == pytest.approx(5, abs=5)
    assert stats[1].consumers == 0
    await store.read(count=1, share=1, block_ms=100)  # now p1's oldest is pending, p2's too
    stats = await store.queue_stats()
    assert stats[1].oldest_age_s == pytest.approx(60, abs=5)
    assert stats[1].consumers == 1
    entries = await aredis.xrange(keys.stream(1))
    await aredis.xack(keys.stream(1), "bales", entries[0][0])
    stats = await store.queue_stats()
    assert stats[1].oldest_age_s == pytest.approx(30, abs=5)  # the next one, undelivered


async def test_the_lease_refreshes_ours_skips_acked_and_reports_stolen(store, aredis, keys):
    await fill(aredis, keys, 1, 3)
    mine, acked, stolen = await store.read(count=8, share=1, block_ms=100)
    await aredis.xack(keys.stream(1), "bales", acked.entry_id)
    await aredis.xclaim(keys.stream(1), "bales", "thief", 0, [stolen.entry_id])
    held = [(1, mine.entry_id), (1, acked.entry_id), (1, stolen.entry_id)]
    before = await aredis.xpending_range(keys.stream(1), "bales", mine.entry_id, mine.entry_id, 1)
    assert await store.refresh_lease(held) == 1  # only the stolen one counts as lost
    after = await aredis.xpending_range(keys.stream(1), "bales", mine.entry_id, mine.entry_id, 1)
    assert after[0]["consumer"] == b"me"
    assert after[0]["times_delivered"] == before[0]["times_delivered"]  # JUSTID: not a delivery
    thief = await aredis.xpending_range(
        keys.stream(1), "bales", stolen.entry_id, stolen.entry_id, 1
    )
    assert thief[0]["consumer"] == b"thief"  # never taken back


async def test_reclaim_takes_idle_entries_and_reports_deliveries(store, aredis, keys):
    await fill(aredis, keys, 0, 2)
    await aredis.xreadgroup("bales", "dead", {keys.stream(0): ">"}, count=2)
    claimed = await store.reclaim(0, "0-0", min_idle_ms=0, count=10)
    assert [e.fields[b"request_id"] for e in claimed.entries] == [b"p0-0", b"p0-1"]
    assert set(claimed.deliveries.values()) == {2}
    assert claimed.cursor == "0-0"  # one pass covered everything


async def test_the_service_client_packs_commands_with_hiredis_as_redis_py_would(redis_url, prefix):
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from bales_stream.service import connect  # packs with bales_producer.connection

    client = connect(redis_url)
    try:
        connection = client.connection_pool.make_connection()
        assert type(connection).__name__ == "HiredisConnection"
        plain = Connection()
        for args in (
            ("XINFO GROUPS", "s"),  # a two-word command is split, as redis-py does
            ("EVALSHA", "a" * 40, 2, "k1", b"k2", 300, 1.5, "é", b"\x00\xff" * 600),
            ("SET", memoryview(b"key"), bytearray(b"value")),
        ):
            assert b"".join(connection.pack_command(*args)) == b"".join(plain.pack_command(*args))
        for bad in (None, [1], {"a": 1}):
            with pytest.raises(DataError):
                connection.pack_command("SET", "k", bad)
        key = f"{prefix}:packed-é"
        assert await client.set(key, b"\x00v") and await client.get(key) == b"\x00v"
    finally:
        await client.delete(f"{prefix}:packed-é")
        await client.aclose()
