"""Sharding (SHARDS=N) on one Redis node: the producer's shard pick, consumers serving all
shards or a subset, and recovery, dead letters and stats per shard. The same on a real
Redis Cluster is in test_cluster.py."""

from __future__ import annotations

import asyncio
import zlib

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis
from bales_producer import AsyncClient, Client, KeySpace
from bales_producer.core import ClientCore

from bales_stream.models import builtin_stub
from bales_stream.settings import SettingsError, load_settings, parse_shards
from bales_stream.shards import UNSHARDED

from .conftest import wait_for

STUB_JSON = "[" + ",".join(["0.5"] * 128) + "]"


def test_shard_keys_keep_the_v1_names_with_one_shard_and_get_own_hash_tags_with_more() -> None:
    assert KeySpace("bales").stream(0) == "bales:{requests}:p0"
    sharded = KeySpace("bales", shards=4)
    assert sharded.for_shard(3).stream(2) == "bales:{requests.3}:p2"
    assert sharded.for_shard(1).dead_letter == "bales:{requests.1}:dead"
    # what the whole fleet shares stays on the queue's own tag
    assert sharded.for_shard(2).desired_models == "bales:{requests}:models"
    assert sharded.shard_count == "bales:{requests}:shards"
    with pytest.raises(ValueError, match=r"shard must be 0\.\.3"):
        sharded.for_shard(4)


def test_a_request_goes_to_the_crc32_shard_of_its_id() -> None:
    core = ClientCore(KeySpace("bales"), shards=5)
    for request_id in ("a", "req-17", "0123456789abcdef-ff"):
        shard = zlib.crc32(request_id.encode()) % 5
        request = core.build("stub_v1", [0.0], request_id=request_id)
        assert (request.shard, request.stream) == (shard, f"bales:{{requests.{shard}}}:p1")


def test_serve_shards_accepts_lists_and_ranges_and_names_what_is_wrong() -> None:
    assert parse_shards("", 3) == (0, 1, 2)
    assert parse_shards("0, 2,4-6", 8) == (0, 2, 4, 5, 6)
    with pytest.raises(ValueError, match=r"numbered 0..3 \(SHARDS=4\)"):
        parse_shards("2-4", 4)
    with pytest.raises(SettingsError, match="SERVE_SHARDS"):
        load_settings(shards=2, serve_shards="x")


async def test_every_shard_is_served_and_the_producer_learns_the_shard_count(
    service_factory, redis_url, prefix, aredis: aioredis.Redis
) -> None:
    keys = KeySpace(prefix, shards=3)
    inputs = np.random.default_rng(5).standard_normal((90, 128)).astype(np.float32)
    async with service_factory(shards=3, max_batch_size=8) as svc:
        assert await aredis.get(keys.shard_count) == b"3"
        async with AsyncClient(redis_url, prefix=prefix) as client:  # shards: read from Redis
            replies = await asyncio.gather(*(client.infer("stub_v1", row) for row in inputs))
        stats = await svc.worker.streams.queue_stats()
    expected = [r["label"] for r in builtin_stub("stub_v1").predict_array(inputs)]
    assert [r["result"]["label"] for r in replies] == expected
    lengths = [await aredis.xlen(keys.for_shard(k).stream(1)) for k in range(3)]
    assert sum(lengths) == 90 and all(n > 10 for n in lengths)  # crc32 spreads them
    served = {(s.shard, s.priority) for s in stats}
    assert served == {(k, p) for k in (0, 1, 2, UNSHARDED) for p in range(3)}
    assert all((s.lag, s.pending) == (0, 0) for s in stats)


def send_with_sync_client(redis_url: str, prefix: str, ids: list[str]) -> list[dict]:
    with Client(redis_url, prefix=prefix, shards=3) as client:
        for request_id in ids:
            client.submit("stub_v1", [0.25] * 128, request_id=request_id)
        return [client.result(request_id, timeout_s=20) for request_id in ids]


async def test_consumers_serving_disjoint_subsets_answer_everything_from_their_own_shards(
    service_factory, redis_url, prefix
) -> None:
    async with (
        service_factory(shards=3, serve_shards="0") as first,
        service_factory(shards=3, serve_shards="1-2") as second,
    ):
        assert list(first.worker.streams.stores) == [0, UNSHARDED]  # v1 streams with shard 0
        assert list(second.worker.streams.stores) == [1, 2]
        ids = [f"s-{i}" for i in range(60)]
        replies = await asyncio.to_thread(send_with_sync_client, redis_url, prefix, ids)
        first_count = first.worker.metrics.requests.labels("stub_v1", "ok")._value.get()
        second_count = second.worker.metrics.requests.labels("stub_v1", "ok")._value.get()
    on_shard_0 = sum(1 for request_id in ids if zlib.crc32(request_id.encode()) % 3 == 0)
    assert all(r["status"] == "ok" for r in replies)
    assert (first_count, second_count) == (on_shard_0, 60 - on_shard_0)


async def test_a_dead_consumers_entries_on_another_shard_are_reclaimed_and_answered(
    service_factory, aredis: aioredis.Redis, prefix
) -> None:
    shard2 = KeySpace(prefix, shards=3).for_shard(2)
    for i in range(4):
        await aredis.xadd(
            shard2.stream(0),
            {"request_id": f"o-{i}", "model_id": "stub_v1", "input": STUB_JSON},
        )
    await aredis.xgroup_create(shard2.stream(0), "bales", id="0", mkstream=True)
    await aredis.xreadgroup("bales", "ghost", {shard2.stream(0): ">"}, count=10)
    async with service_factory(shards=3, claim_idle_ms=200) as svc:
        replies = [await aredis.blpop([shard2.reply(f"o-{i}")], timeout=20) for i in range(4)]
        assert all(reply is not None and b'"status":"ok"' in reply[1] for reply in replies)
        await wait_for(lambda: svc.worker.metrics.reclaimed._value.get() == 4)
    assert (await aredis.xpending(shard2.stream(0), "bales"))["pending"] == 0


async def test_an_unanswerable_entry_is_dead_lettered_on_its_own_shard(
    service_factory, aredis: aioredis.Redis, prefix
) -> None:
    shard1 = KeySpace(prefix, shards=2).for_shard(1)
    async with service_factory(shards=2) as svc:
        await aredis.xadd(shard1.stream(1), {"model_id": "stub_v1"})  # no request_id
        await wait_for(lambda: svc.worker.metrics.dead_letters._value.get() == 1)
    dead = await aredis.xrange(shard1.dead_letter)
    assert dead[0][1][b"stream"] == shard1.stream(1).encode()
    assert dead[0][1][b"reason"] == b"missing field request_id"


async def test_a_consumer_publishes_its_shard_count_over_whatever_was_there(
    service_factory, aredis: aioredis.Redis, prefix, caplog
) -> None:
    keys = KeySpace(prefix)
    await aredis.set(keys.shard_count, b"not a number")
    async with service_factory(shards=2):
        assert await aredis.get(keys.shard_count) == b"2"
    assert "shard count changes from not a number to 2" in caplog.text


async def test_producers_that_predate_sharding_are_still_served(
    service_factory, aredis: aioredis.Redis, prefix
) -> None:
    v1 = KeySpace(prefix)  # bales:{requests}:p*, what a v1 producer writes to
    async with service_factory(shards=3) as svc:
        await aredis.xadd(
            v1.stream(1),
            {"request_id": "v1-req", "model_id": "stub_v1", "input": STUB_JSON},
        )
        reply = await aredis.blpop([v1.reply("v1-req")], timeout=20)
        async with aiohttp.ClientSession() as http, http.get(f"{svc.base_url}/health") as got:
            queues = (await got.json())["queues"]
    assert reply is not None and b'"status":"ok"' in reply[1]
    v1_rows = [q for q in queues if q["shard"] is None]
    assert [q["stream"] for q in v1_rows] == v1.streams
    assert {q["shard"] for q in queues} == {None, 0, 1, 2}


async def test_a_request_past_its_deadline_on_a_shard_is_answered_expired_not_computed(
    service_factory, aredis: aioredis.Redis, prefix
) -> None:
    shard1 = KeySpace(prefix, shards=2).for_shard(1)
    await aredis.xadd(  # enqueued at ms 1000 of 1970 with a 1 s timeout: long expired
        shard1.stream(2),
        {"request_id": "late", "model_id": "stub_v1", "input": STUB_JSON, "timeout_ms": "1000"},
        id="1000-0",
    )
    async with service_factory(shards=2) as svc:
        reply = await aredis.blpop([shard1.reply("late")], timeout=20)
        assert svc.worker.metrics.requests.labels("stub_v1", "expired")._value.get() == 1
    assert reply is not None and b'"code":"expired"' in reply[1]
    assert (await aredis.xpending(shard1.stream(2), "bales"))["pending"] == 0
