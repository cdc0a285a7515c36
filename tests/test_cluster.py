"""Redis Cluster: real clusters (redis-server processes in cluster mode, joined with
``redis-cli --cluster create``): the stream store's cluster paths (reply keys live in other
hash slots than the request streams), the service end to end with and without shards,
crash recovery, and primary failovers (graceful, and SIGKILL)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
import redis.asyncio as aioredis
from bales_producer import AsyncClient, KeySpace
from redis.asyncio.cluster import RedisCluster

from bales_stream.metrics import Metrics
from bales_stream.models import builtin_stub
from bales_stream.replies import Completion
from bales_stream.service import build_worker, connect
from bales_stream.settings import Settings, load_settings
from bales_stream.streams import StreamEntry, StreamStore
from bales_stream.worker import Worker
from benchmarks.local_cluster import LocalCluster

from .conftest import ROOT, wait_for

pytestmark = pytest.mark.slow  # real clusters: run by CI, skipped by `make test-fast`


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    running = LocalCluster(primaries=3).start()
    yield running
    running.stop()


@pytest.fixture
async def rc(cluster: LocalCluster) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(cluster.url)
    await client.initialize()  # learn the slot map
    yield client
    await client.aclose()


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace(f"c{uuid.uuid4().hex[:8]}")


async def store_for(rc: RedisCluster, keys: KeySpace, consumer: str) -> StreamStore:
    store = StreamStore(rc, keys, "bales", consumer, reply_ttl_s=60, cluster=True)  # type: ignore[arg-type]
    await store.ensure_groups()
    return store


def cluster_settings(cluster: LocalCluster, prefix: str, **extra: object) -> Settings:
    return load_settings(
        redis_url=cluster.url,
        redis_cluster=True,
        key_prefix=prefix,
        weights_dir=ROOT / "weights",
        read_block_ms=200,
        **extra,
    )


def completion(entry: StreamEntry, request_id: str, reply_to: str | None = None) -> Completion:
    document = json.dumps({"request_id": request_id, "status": "ok"}).encode()
    return Completion(entry.priority, entry.entry_id, request_id, document, reply_to)


async def test_the_cluster_spreads_reply_keys_over_its_primaries(rc, keys) -> None:
    slots = {RedisCluster.keyslot(rc, keys.reply(f"r{i}")) for i in range(30)}
    nodes = {rc.get_node_from_key(keys.reply(f"r{i}")).name for i in range(30)}
    assert len(slots) > 1 and len(nodes) == 3
    assert len({RedisCluster.keyslot(rc, stream) for stream in keys.streams}) == 1


async def test_completion_on_a_cluster_writes_each_reply_once_then_acks(rc, keys) -> None:
    store = await store_for(rc, keys, "me")
    for i in range(20):
        await rc.xadd(keys.stream(i % 3), {"request_id": f"r{i}"})
    entries = await store.read(count=20, share=20, block_ms=100)
    assert len(entries) == 20
    inbox = keys.inbox("client-1")
    done = [completion(e, e.fields[b"request_id"].decode(), inbox) for e in entries]
    assert (await store.complete(done)).stale == 0
    for item in done:
        assert await rc.lrange(keys.reply(item.request_id), 0, -1) == [item.document]
    assert await rc.llen(inbox) == 20
    assert [s.pending for s in await store.queue_stats()] == [0, 0, 0]
    assert (
        await store.complete(done)
    ).stale == 20  # already acked: refused, counted, not rewritten
    for item in done:
        assert await rc.lrange(keys.reply(item.request_id), 0, -1) == [item.document]


async def test_replies_sent_to_a_primary_that_does_not_own_them_fall_back_and_land_once(
    rc, keys
) -> None:
    store = await store_for(rc, keys, "me")
    for i in range(12):
        await rc.xadd(keys.stream(1), {"request_id": f"w{i}"})
    entries = await store.read(count=12, share=12, block_ms=100)
    done = [completion(e, e.fields[b"request_id"].decode()) for e in entries]
    # a stale slot map: each primary's plain client talks to another primary
    names = [node.name for node in rc.get_primaries()]
    assert store.cluster_writes is not None
    for name, other in zip(names, names[1:] + names[:1], strict=True):
        node = rc.get_node(node_name=other)
        store.cluster_writes.nodes._clients[name] = aioredis.Redis(host=node.host, port=node.port)
    assert (await store.complete(done)).stale == 0  # Redis refused the non-local keys; retried
    for item in done:
        assert await rc.lrange(keys.reply(item.request_id), 0, -1) == [item.document]
    assert store.cluster_writes.nodes._clients == {}  # the fast path starts afresh
    assert [s.pending for s in await store.queue_stats()] == [0, 0, 0]


async def test_a_stale_owner_on_a_cluster_cannot_ack_and_its_reply_is_written_once(
    rc, keys
) -> None:
    old = await store_for(rc, keys, "old")
    new = await store_for(rc, keys, "new")
    await rc.xadd(keys.stream(1), {"request_id": "r1"})
    (entry,) = await old.read(count=1, share=1, block_ms=100)
    await rc.xclaim(keys.stream(1), "bales", "new", 0, [entry.entry_id])
    assert (await old.complete([completion(entry, "r1")])).stale == 1  # the fence refuses the ack
    assert (await rc.xpending(keys.stream(1), "bales"))["pending"] == 1
    late = Completion(1, entry.entry_id, "r1", b'{"second": true}', None)
    assert (await new.complete([late])).stale == 0
    replies = await rc.lrange(keys.reply("r1"), 0, -1)
    assert len(replies) == 1  # written once, whoever came first
    assert (await rc.xpending(keys.stream(1), "bales"))["pending"] == 0


async def test_dead_lettering_on_a_cluster_records_replies_and_acks(rc, keys) -> None:
    store = await store_for(rc, keys, "me")
    await rc.xadd(keys.stream(2), {"request_id": "bad", "model_id": "m"})
    (entry,) = await store.read(count=1, share=1, block_ms=100)
    await store.dead_letter(entry, "failed on 3 deliveries", completion(entry, "bad"))
    (record,) = await rc.xrange(keys.dead_letter)
    assert record[1][b"reason"] == b"failed on 3 deliveries"
    assert record[1][b"field:model_id"] == b"m"
    assert await rc.llen(keys.reply("bad")) == 1
    assert (await rc.xpending(keys.stream(2), "bales"))["pending"] == 0


async def test_the_service_answers_through_a_cluster_and_reloads_fleet_wide(cluster) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    settings = cluster_settings(cluster, prefix)
    worker = build_worker(settings, connect(cluster.url, cluster=True), Metrics())
    await worker.start()
    try:
        inputs = np.random.default_rng(7).standard_normal((300, 128)).astype(np.float32)
        async with AsyncClient(cluster.url, prefix=prefix, cluster=True) as client:
            replies = [
                await client.infer("stub_v1", row, priority=i % 3)
                for i, row in enumerate(inputs[:5])
            ]
            replies += await asyncio.gather(
                *(client.infer("stub_v1", row, priority=i % 3) for i, row in enumerate(inputs[5:]))
            )
        expected = [r["label"] for r in builtin_stub("stub_v1").predict_array(inputs)]
        assert [r["result"]["label"] for r in replies] == expected
        assert max(r["batch_size"] for r in replies) > 1
        outcome = await worker.control.reload("stub_v1", "stub_v2.pt")
        assert outcome["version"].startswith("stub_v2-") and outcome["consumers_notified"] >= 1
        stats = await worker.streams.queue_stats()
        assert [(s.lag, s.pending) for s in stats] == [(0, 0)] * 3
    finally:
        await worker.stop()


def run_info(prefix: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``bales-stream info`` in a child process with this key prefix and settings."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "KEY_"))}
    return subprocess.run(
        [sys.executable, "-m", "bales_stream", "info"],
        cwd=ROOT,
        env={**clean, "KEY_PREFIX": prefix, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_info_works_against_a_cluster(cluster) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    info = run_info(prefix, REDIS_URL=cluster.url, REDIS_CLUSTER="true")
    assert info.returncode == 0, info.stderr
    assert f"{prefix}:{{requests}}:p0" in info.stdout


def test_cli_info_shows_each_shard_and_the_primary_holding_it(cluster) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    url = cluster.url.replace("redis://", "redis+cluster://")
    info = run_info(prefix, REDIS_URL=url, SHARDS="3")
    assert info.returncode == 0, info.stderr
    rows = [line.split() for line in info.stdout.splitlines() if f"{prefix}:" in line]
    shards = [*(str(k) for k in range(3)), "v1"]  # the v1 streams are served too
    assert [(row[0], row[1]) for row in rows] == [(k, f"p{p}") for k in shards for p in range(3)]
    nodes = {row[0]: row[-1] for row in rows if row[0] != "v1"}
    assert len(set(nodes.values())) == 3  # three shards on three primaries
    assert all(node.startswith("127.0.0.1:") for node in nodes.values())


async def test_a_dead_consumers_entries_are_reclaimed_and_answered_on_a_cluster(
    cluster, rc
) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix)
    dead = await store_for(rc, keys, "dead")
    inputs = np.random.default_rng(3).standard_normal((20, 128)).astype(np.float32)
    for i, row in enumerate(inputs):
        await rc.xadd(
            keys.stream(i % 3),
            {
                "request_id": f"d{i}",
                "model_id": "stub_v1",
                "encoding": "f32",
                "input": row.tobytes(),
            },
        )
    taken = await dead.read(count=20, share=20, block_ms=100)
    assert len(taken) == 20  # read, never answered: its consumer "died"
    settings = cluster_settings(cluster, prefix, claim_idle_ms=300)
    worker = build_worker(settings, connect(cluster.url, cluster=True), Metrics())
    await worker.start()
    try:
        async with AsyncClient(cluster.url, prefix=prefix, cluster=True) as client:
            replies = [await client.result(f"d{i}", timeout_s=30) for i in range(20)]
    finally:
        await worker.stop()
    expected = [r["label"] for r in builtin_stub("stub_v1").predict_array(inputs)]
    assert [r["result"]["label"] for r in replies] == expected
    assert worker.metrics.registry.get_sample_value("bales_reclaimed_total") == 20


async def replica_of(cluster: LocalCluster, primary_port: int) -> aioredis.Redis:
    """A client of the node that replicates the primary on ``primary_port``."""
    for node in cluster.nodes:
        client = aioredis.Redis.from_url(node.url)
        replication = await client.info("replication")
        if replication["role"] == "slave" and replication["master_port"] == primary_port:
            return client
        await client.aclose()
    raise AssertionError(f"no replica of the primary on port {primary_port}")


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[LocalCluster]:
    running = LocalCluster(primaries=3, replicas=1).start()
    yield running
    running.stop()


async def test_a_primary_failover_under_traffic_loses_no_request(replicated_cluster) -> None:
    cluster = replicated_cluster
    prefix = f"c{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix)
    admin = RedisCluster.from_url(cluster.url)
    await admin.initialize()
    primary = admin.get_node_from_key(keys.stream(0))
    replica = await replica_of(cluster, primary.port)
    settings = cluster_settings(cluster, prefix)
    worker = build_worker(settings, connect(cluster.url, cluster=True), Metrics())
    await worker.start()
    inputs = np.random.default_rng(11).standard_normal((400, 128)).astype(np.float32)
    try:
        async with AsyncClient(cluster.url, prefix=prefix, cluster=True) as client:
            first = [client.infer("stub_v1", row, timeout_s=60) for row in inputs[:200]]
            sent = asyncio.gather(*first)
            await replica.execute_command("CLUSTER FAILOVER")
            async with asyncio.timeout(30):
                while (await replica.info("replication"))["role"] != "master":
                    await asyncio.sleep(0.05)  # the replica's role: no event to wait on
            after = [client.infer("stub_v1", row, timeout_s=60) for row in inputs[200:]]
            replies = await sent + await asyncio.gather(*after)
        expected = [r["label"] for r in builtin_stub("stub_v1").predict_array(inputs)]
        assert [r["result"]["label"] for r in replies] == expected
        stats = await worker.streams.queue_stats()
        assert [(s.lag, s.pending) for s in stats] == [(0, 0)] * 3
    finally:
        await worker.stop()
        await admin.aclose()
        await replica.aclose()


async def test_shards_spread_over_the_primaries_and_every_shard_is_served(cluster) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix, shards=3)
    settings = cluster_settings(cluster, prefix, shards=3, max_batch_size=16)
    redis_client = connect(cluster.url, cluster=True)
    await redis_client.initialize()
    nodes = {redis_client.get_node_from_key(keys.for_shard(k).stream(0)).name for k in range(3)}
    assert len(nodes) == 3  # {requests.0..2} hash to slots on three different primaries
    worker = build_worker(settings, redis_client, Metrics())
    await worker.start()
    inputs = np.random.default_rng(17).standard_normal((300, 128)).astype(np.float32)
    try:
        url = cluster.url.replace("redis://", "redis+cluster://")
        async with AsyncClient(url, prefix=prefix) as client:  # cluster and shards: discovered
            replies = await asyncio.gather(*(client.infer("stub_v1", row) for row in inputs))
        stats = await worker.streams.queue_stats()
        lengths = [await redis_client.xlen(keys.for_shard(k).stream(1)) for k in range(3)]
    finally:
        await worker.stop()
        await redis_client.aclose()
    expected = [r["label"] for r in builtin_stub("stub_v1").predict_array(inputs)]
    assert [r["result"]["label"] for r in replies] == expected
    assert sum(lengths) == 300 and min(lengths) > 60
    assert len(stats) == 12  # 3 shards + the v1 streams, 3 priorities each
    assert all((s.lag, s.pending) == (0, 0) for s in stats)


async def primary_offsets_settled(primary: aioredis.Redis, replica: aioredis.Redis) -> bool:
    """True when the replica has everything the primary wrote (nothing writes meanwhile)."""
    written = (await primary.info("replication"))["master_repl_offset"]
    return (await replica.info("replication"))["slave_repl_offset"] == written


async def test_a_sigkilled_primary_fails_over_and_no_replicated_request_is_lost() -> None:
    """kill -9 of the primary holding one shard, mid-traffic: the replica takes over (after
    the node timeout), the consumer carries on, and every request Redis had replicated
    before the kill, and every one sent after, is answered correctly. (Writes a killed
    primary acknowledged but had not replicated are lost by Redis itself: README.)"""
    cluster = LocalCluster(primaries=3, replicas=1, node_timeout_ms=1000).start()
    prefix = f"c{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix, shards=3)
    settings = cluster_settings(cluster, prefix, shards=3, claim_idle_ms=500, redis_timeout_s=2)
    redis_client = connect(cluster.url, cluster=True)
    worker = build_worker(settings, redis_client, Metrics())
    inputs = np.random.default_rng(23).standard_normal((400, 128)).astype(np.float32)
    try:
        await redis_client.initialize()
        async with AsyncClient(cluster.url, prefix=prefix, cluster=True, shards=3) as client:
            # the victim: a shard's primary that does not hold this client's reply inbox
            inbox_node = redis_client.get_node_from_key(client.inbox).port
            victim = next(
                node
                for k in range(3)
                if (node := redis_client.get_node_from_key(keys.for_shard(k).stream(0))).port
                != inbox_node
            )
            server = next(n for n in cluster.nodes if n.port == victim.port)
            primary = aioredis.Redis.from_url(server.url)
            replica = await replica_of(cluster, victim.port)
            ids = [await client.submit("stub_v1", row, timeout_s=90) for row in inputs[:200]]
            async with asyncio.timeout(10):
                while not await primary_offsets_settled(primary, replica):
                    await asyncio.sleep(0.01)  # replication offsets: no event to wait on
            await primary.aclose()
            first = [asyncio.ensure_future(client.result(i, timeout_s=90)) for i in ids]
            await worker.start()
            batches = worker.metrics.registry.get_sample_value
            await wait_for(lambda: (batches("bales_batch_size_count") or 0) >= 2, timeout_s=30)
            await asyncio.to_thread(server.kill)  # SIGKILL under traffic
            unanswered_at_kill = sum(not reply.done() for reply in first)
            async with asyncio.timeout(30):
                while (await replica.info("replication"))["role"] != "master":
                    await asyncio.sleep(0.05)  # the replica's role: no event to wait on
            after = [client.infer("stub_v1", row, timeout_s=90) for row in inputs[200:]]
            replies = await asyncio.gather(*first) + await asyncio.gather(*after)
        assert unanswered_at_kill > 0
        expected = [r["label"] for r in builtin_stub("stub_v1").predict_array(inputs)]
        assert [r["result"]["label"] for r in replies] == expected
        await wait_for(lambda: settled(worker), timeout_s=30)  # lost acks are redone
        assert worker.metrics.redis_errors._value.get() > 0  # it did see the primary die
    finally:
        await worker.stop()
        await redis_client.aclose()
        cluster.stop()


async def settled(worker: Worker) -> bool:
    stats = await worker.streams.queue_stats()
    return all((s.lag, s.pending) == (0, 0) for s in stats)


async def test_hostile_entries_on_a_cluster_are_answered_and_acked(cluster, rc) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix)
    await rc.hset(keys.desired_models, mapping={"stub_v1": "junk", "bad id!": "{}"})
    settings = cluster_settings(cluster, prefix, max_input_bytes=4096)
    worker = build_worker(settings, connect(cluster.url, cluster=True), Metrics())
    await worker.start()  # junk in the models hash does not stop it
    try:
        good = json.dumps([0.5] * 128)
        await rc.set(keys.inbox("taken"), "not a list")
        await rc.hset(keys.reply("squatted"), "k", "v")
        entries = {
            "to-bad-inbox": {"input": good, "reply_to": keys.inbox("taken")},
            "squatted": {"input": good},
            "too-big": {"input": "[" + "1," * 5000 + "1]"},
            "odd-timeout": {"input": good, "timeout_ms": "²"},
            "canary": {"input": good},
        }
        for request_id, fields in entries.items():
            body = {"request_id": request_id, "model_id": "stub_v1", **fields}
            await rc.xadd(keys.stream(1), body)  # type: ignore[arg-type]

        async def reply(request_id: str) -> dict:
            popped = await rc.blpop([keys.reply(request_id)], timeout=10)
            assert popped is not None, request_id
            return json.loads(popped[1])

        assert (await reply("to-bad-inbox"))["status"] == "ok"
        assert (await reply("too-big"))["error"]["code"] == "invalid_request"
        assert (await reply("odd-timeout"))["error"]["code"] == "invalid_request"
        assert (await reply("canary"))["status"] == "ok"
        await wait_for(lambda: worker.metrics.undeliverable.labels("reply")._value.get() == 1)
        assert worker.metrics.undeliverable.labels("inbox")._value.get() == 1
        assert await rc.get(keys.inbox("taken")) == b"not a list"
        assert await rc.hgetall(keys.reply("squatted")) == {b"k": b"v"}
        assert (await rc.xpending(keys.stream(1), "bales"))["pending"] == 0
        assert worker.status.ready and worker.status.problems == []
    finally:
        await worker.stop()
