"""Redis faults with real processes: a crash and restart, and a stall longer than the claim
idle time. Each test runs its own redis-server, so it can be killed or frozen."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator

import pytest
import redis
from bales_producer import KeySpace

from bales_stream.embedded_redis import RedisServer

from .conftest import wait_for

INPUT = json.dumps([0.5] * 128)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer(None, None, "--appendonly", "yes", "--appendfsync", "always").start()
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)
    server.stop()


def enqueue(client: redis.Redis, keys: KeySpace, ids: range, prefix: str) -> None:
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.xadd(
            keys.stream(i % 3),
            {
                "request_id": f"{prefix}-{i}",
                "model_id": "stub_v1",
                "input": INPUT,
                "timeout_ms": "60000",
            },
        )
    pipe.execute()


def answered(client: redis.Redis, keys: KeySpace, ids: range, prefix: str) -> int:
    pipe = client.pipeline(transaction=False)
    for i in ids:
        pipe.exists(keys.reply(f"{prefix}-{i}"))
    return sum(pipe.execute())


@pytest.mark.slow
async def test_redis_crash_and_restart_lose_no_accepted_request(
    service_factory, private_redis, prefix
) -> None:
    keys = KeySpace(prefix)
    client = redis.Redis.from_url(private_redis.url)
    async with service_factory(
        redis_url=private_redis.url, redis_timeout_s=1.0, claim_idle_ms=500
    ) as svc:
        enqueue(client, keys, range(0, 500), "a")
        await wait_for(lambda: answered(client, keys, range(0, 500), "a") >= 100)
        await asyncio.to_thread(private_redis.kill)  # kill -9 mid-traffic
        await asyncio.to_thread(private_redis.start)  # AOF (fsync always) brings it back
        client = redis.Redis.from_url(private_redis.url)
        enqueue(client, keys, range(500, 700), "a")  # traffic after the restart too
        await wait_for(lambda: answered(client, keys, range(0, 700), "a") == 700, timeout_s=60)
        assert svc.worker.status.ready
    documents = [json.loads(client.lindex(keys.reply(f"a-{i}"), 0)) for i in range(700)]
    assert all(d["status"] == "ok" for d in documents)
    assert sum(client.xpending(s, "bales")["pending"] for s in keys.streams) == 0


@pytest.mark.slow
async def test_a_redis_stall_longer_than_the_claim_idle_time_loses_nothing(
    service_factory, private_redis, prefix
) -> None:
    keys = KeySpace(prefix)
    client = redis.Redis.from_url(private_redis.url)
    settings = {"redis_url": private_redis.url, "claim_idle_ms": 300, "redis_timeout_s": 1.0}
    async with service_factory(**settings) as first, service_factory(**settings) as second:
        enqueue(client, keys, range(0, 400), "s")
        await wait_for(lambda: answered(client, keys, range(0, 400), "s") >= 50)
        os.kill(private_redis.process.pid, signal.SIGSTOP)
        await asyncio.sleep(1.5)  # the fault itself: Redis frozen for 5x CLAIM_IDLE_MS
        os.kill(private_redis.process.pid, signal.SIGCONT)
        await wait_for(lambda: answered(client, keys, range(0, 400), "s") == 400, timeout_s=60)
        await wait_for(lambda: first.worker.status.ready and second.worker.status.ready)
    pending = sum(client.xpending(s, "bales")["pending"] for s in keys.streams)
    assert pending == 0
    assert all(client.llen(keys.reply(f"s-{i}")) == 1 for i in range(400))


@pytest.mark.slow
async def test_a_consumer_cut_off_from_redis_is_fenced_and_loses_nothing(
    service_factory, redis_server, prefix
) -> None:
    from benchmarks.fault_proxy import FaultProxy

    keys = KeySpace(prefix)
    client = redis.Redis.from_url(redis_server.url)
    proxy = await FaultProxy("127.0.0.1", redis_server.port).start()
    common = {"claim_idle_ms": 300, "redis_timeout_s": 0.5}
    try:
        async with service_factory(
            redis_url=proxy.url(), batch_window_ms=1500, max_batch_size=256, **common
        ) as cut_off:
            enqueue(client, keys, range(100), "p")
            await wait_for(lambda: len(cut_off.worker.held()) == 100)  # all read, none answered
            proxy.blackhole()  # the partition: its lease and its replies cannot get through
            async with service_factory(redis_url=redis_server.url, **common) as rescuer:
                await wait_for(lambda: answered(client, keys, range(100), "p") == 100)
                assert rescuer.worker.metrics.reclaimed._value.get() == 100
                proxy.heal()
                await wait_for(
                    lambda: cut_off.worker.metrics.stale_completions._value.get() > 0, timeout_s=30
                )
                await wait_for(lambda: not cut_off.worker.held(), timeout_s=30)
    finally:
        await proxy.stop()
    assert all(client.llen(keys.reply(f"p-{i}")) == 1 for i in range(100))
    assert sum(client.xpending(s, "bales")["pending"] for s in keys.streams) == 0
