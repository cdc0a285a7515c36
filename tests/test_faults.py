"""Redis faults with real processes: a crash and restart, and a stall longer than the claim
idle time. Each test runs its own redis-server, so it can be killed or frozen."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from collections.abc import Iterator

import pytest
import redis
from bales_producer import KeySpace
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
        await wait_for(lambda: svc.worker.status.ready)  # at the next successful Redis call
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
            redis_url=proxy.url(),
            batch_window_ms=1500,
            adaptive_window=False,
            max_batch_size=256,
            **common,
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


field_values = st.one_of(
    st.binary(max_size=40),
    st.sampled_from([b"stub_v1", b"f32", b"json", b"100", b"[1,2]", b"", b"bales:inbox:x"]),
)
entries_strategy = st.lists(
    st.dictionaries(
        st.sampled_from(
            [
                "request_id",
                "model_id",
                "input",
                "encoding",
                "model_type",
                "timeout_ms",
                "reply_to",
                "extra",
            ]
        ),
        field_values,
        min_size=1,
        max_size=8,
    ),
    min_size=150,
    max_size=150,
)


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(entries=entries_strategy)
async def test_arbitrary_entries_are_answered_or_dead_lettered(
    service_factory, redis_server, entries
) -> None:
    keys = KeySpace(f"h{uuid.uuid4().hex[:10]}")
    client = redis.Redis.from_url(redis_server.url)
    async with service_factory(key_prefix=keys.prefix) as svc:
        pipe = client.pipeline(transaction=False)
        for i, fields in enumerate(entries):
            pipe.xadd(keys.stream(i % 3), fields or {"extra": b""})
        valid_ids = [e.get("request_id", b"") for e in entries]
        pipe.execute()
        enqueued = len(entries)

        def settled() -> bool:
            lengths = [client.xlen(s) for s in keys.streams]
            pending = sum(client.xpending(s, "bales")["pending"] for s in keys.streams)
            groups = [g for s in keys.streams for g in client.xinfo_groups(s)]
            return sum(lengths) == enqueued and pending == 0 and all(g["lag"] == 0 for g in groups)

        await wait_for(settled, timeout_s=30)
        assert svc.worker.status.ready  # it never crashed or stalled
    dead = client.xlen(keys.dead_letter)
    usable = {i for i in valid_ids if re.fullmatch(rb"[A-Za-z0-9._:-]{1,128}", i)}
    for request_id in usable:
        reply = json.loads(client.lindex(keys.reply(request_id.decode()), 0))
        code = reply.get("error", {}).get("code")
        assert reply["status"] == "ok" or code in {"invalid_request", "unknown_model", "expired"}
    assert dead >= enqueued - sum(valid_ids.count(i) for i in usable)
