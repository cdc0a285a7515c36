"""At-least-once delivery: reclaiming a dead consumer's work, leases, poison isolation,
dead letters, trimming, and a clean stop that leaves nothing behind."""

from __future__ import annotations

import json

import redis.asyncio as aioredis
from bales_producer import KeySpace

from benchmarks import fault_models

from .conftest import wait_for
from .test_worker import STUB_INPUT, pending_count, reply_of, xadd


def swap_module(worker, module) -> None:
    fault_models.swap_module(worker.registry, "stub_v1", module)


async def test_a_dead_consumers_entries_are_reclaimed_and_answered(
    service_factory, aredis: aioredis.Redis, keys: KeySpace
) -> None:
    ids = [await xadd(aredis, keys, request_id=f"orphan-{i}", timeout_ms="30000") for i in range(5)]
    await aredis.xgroup_create(keys.stream(1), "bales", id="0", mkstream=True)
    taken = await aredis.xreadgroup("bales", "ghost", {keys.stream(1): ">"}, count=10)
    assert len(taken[0][1]) == len(ids)  # "ghost" took them all and died
    async with service_factory(claim_idle_ms=200) as svc:
        for i in range(5):
            assert (await reply_of(aredis, keys, f"orphan-{i}"))["status"] == "ok"
        assert svc.worker.metrics.reclaimed._value.get() == 5
    assert await pending_count(aredis, keys) == 0


async def test_a_restarted_consumer_answers_its_own_pending_first(
    service_factory, aredis, keys
) -> None:
    await xadd(aredis, keys, request_id="mine-1", timeout_ms="30000")
    await aredis.xgroup_create(keys.stream(1), "bales", id="0", mkstream=True)
    await aredis.xreadgroup("bales", "stable-name", {keys.stream(1): ">"}, count=10)
    async with service_factory(consumer_name="stable-name", claim_idle_ms=600_000) as svc:
        assert (await reply_of(aredis, keys, "mine-1"))["status"] == "ok"
        assert svc.worker.metrics.reclaimed._value.get() == 0


async def test_a_poison_request_is_isolated_then_dead_lettered(
    service_factory, aredis, keys
) -> None:
    async with service_factory(
        claim_idle_ms=200, max_deliveries=2, max_batch_size=16, batch_window_ms=50
    ) as svc:
        model = fault_models.PoisonSensitive(svc.worker.registry.get("stub_v1").module)
        swap_module(svc.worker, model)
        async with aredis.pipeline(transaction=False) as pipe:
            for i in range(16):
                values = [fault_models.POISON if i == 7 else 0.5, *STUB_INPUT[1:]]
                pipe.xadd(
                    keys.stream(1),
                    {
                        "request_id": f"b-{i}",
                        "model_id": "stub_v1",
                        "input": json.dumps(values),
                        "timeout_ms": "30000",
                    },
                )
            await pipe.execute()
        replies = {i: await reply_of(aredis, keys, f"b-{i}") for i in range(16)}
        assert all(replies[i]["status"] == "ok" for i in range(16) if i != 7)
        poison = replies[7]
        assert poison["error"]["code"] == "dead_letter"
        assert "MAX_DELIVERIES=2" in poison["error"]["message"]
        assert model.poison_calls == 2  # isolated and computed exactly MAX_DELIVERIES times
        dead = await aredis.xrange(keys.dead_letter)
        assert len(dead) == 1 and dead[0][1][b"field:request_id"] == b"b-7"
    assert await pending_count(aredis, keys) == 0


async def test_a_slow_batch_is_not_reclaimed_by_another_consumer(
    service_factory, aredis, keys
) -> None:
    claim_idle_ms = 200
    async with (
        service_factory(claim_idle_ms=claim_idle_ms) as slow_svc,
        service_factory(claim_idle_ms=claim_idle_ms, consumer_name="helper") as helper,
    ):
        swap_module(
            slow_svc.worker,
            fault_models.Slow(
                slow_svc.worker.registry.get("stub_v1").module, delay_s=2.5 * claim_idle_ms / 1000
            ),
        )
        swap_module(
            helper.worker,
            fault_models.Slow(
                helper.worker.registry.get("stub_v1").module, delay_s=2.5 * claim_idle_ms / 1000
            ),
        )
        for i in range(6):
            await xadd(aredis, keys, request_id=f"slow-{i}", timeout_ms="30000")
        for i in range(6):
            assert (await reply_of(aredis, keys, f"slow-{i}"))["status"] == "ok"
        for svc in (slow_svc, helper):
            assert svc.worker.metrics.reclaimed._value.get() == 0
            assert svc.worker.metrics.stale_completions._value.get() == 0


async def test_streams_are_trimmed_but_never_below_what_is_pending(
    service_factory, aredis, keys
) -> None:
    await aredis.xgroup_create(keys.stream(2), "bales", id="0", mkstream=True)
    await xadd(aredis, keys, priority=2, request_id="held-by-ghost", timeout_ms="30000")
    await aredis.xreadgroup("bales", "ghost", {keys.stream(2): ">"}, count=1)
    async with service_factory(claim_idle_ms=600_000) as svc:
        for i in range(50):
            await xadd(aredis, keys, priority=2, request_id=f"t-{i}")
        for i in range(50):
            await reply_of(aredis, keys, f"t-{i}")
        await svc.worker.recovery.trim()
        # the ghost's entry (the oldest) is still pending: nothing may be trimmed yet
        assert await aredis.xlen(keys.stream(2)) == 51
        await aredis.xclaim(
            keys.stream(2),
            "bales",
            "ghost",
            0,
            [(await aredis.xpending_range(keys.stream(2), "bales", "-", "+", 1))[0]["message_id"]],
        )
        pending = await aredis.xpending_range(keys.stream(2), "bales", "-", "+", 1)
        await aredis.xack(keys.stream(2), "bales", pending[0]["message_id"])
        await svc.worker.recovery.trim()
        assert await aredis.xlen(keys.stream(2)) == 0
        groups = await aredis.xinfo_groups(keys.stream(2))
        assert groups[0]["lag"] == 0  # lag stays valid for autoscalers


async def test_a_clean_stop_removes_the_consumer_and_leaves_nothing_pending(
    service_factory, aredis, keys
) -> None:
    async with service_factory(consumer_name="short-lived"):
        await xadd(aredis, keys, request_id="last")
        await reply_of(aredis, keys, "last")
    consumers = await aredis.xinfo_consumers(keys.stream(1), "bales")
    assert [c["name"] for c in consumers] == []
    assert await pending_count(aredis, keys) == 0


async def test_a_vanished_group_is_recreated_and_service_resumes(
    service_factory, aredis, keys
) -> None:
    async with service_factory(read_block_ms=100) as svc:
        await xadd(aredis, keys, request_id="before")
        await reply_of(aredis, keys, "before")
        for stream in keys.streams:
            await aredis.xgroup_destroy(stream, "bales")  # e.g. an operator's mistake
        await xadd(aredis, keys, request_id="after", timeout_ms="30000")
        assert (await reply_of(aredis, keys, "after"))["status"] == "ok"
        assert svc.worker.metrics.redis_errors._value.get() >= 1  # it noticed NOGROUP
        await wait_for(lambda: svc.worker.status.ready)


async def test_entries_this_worker_holds_are_never_given_up_when_the_lease_is_late(
    service_factory, aredis, keys
) -> None:
    async with service_factory(
        claim_idle_ms=100,
        max_deliveries=1,
        batch_window_ms=10_000,
        adaptive_window=False,
        max_batch_size=64,
    ) as svc:
        for i in range(5):
            await xadd(aredis, keys, request_id=f"held-{i}", timeout_ms="60000")
        await wait_for(lambda: len(svc.worker.held()) == 5)
        for loop in ("lease", "reclaim"):  # the lease falls behind, as under a stalled loop
            await svc.worker.supervisor.cancel(loop)

        async def idle_enough() -> bool:
            pending = await aredis.xpending_range(keys.stream(1), "bales", "-", "+", 10)
            return all(p["time_since_delivered"] >= 150 for p in pending)

        await wait_for(idle_enough)
        for _ in range(3):  # each pass bumps their delivery count past MAX_DELIVERIES
            await svc.worker.recovery.reclaim()
        assert await aredis.xlen(keys.dead_letter) == 0
        assert len(svc.worker.held()) == 5
    for i in range(5):  # the stop drained the batcher: all answered, none dead-lettered
        assert (await reply_of(aredis, keys, f"held-{i}"))["status"] == "ok"


async def test_a_batch_that_fails_outside_the_model_is_retried_not_stuck(
    service_factory, aredis, keys
) -> None:
    async with service_factory(claim_idle_ms=300) as svc:
        executor = svc.worker.processor.executor
        real_run = executor.run
        failures = []

        async def fail_once(fn, *args):
            if not failures:
                failures.append(fn)
                raise RuntimeError("thread pool refused the batch")  # the injected fault
            return await real_run(fn, *args)

        executor.run = fail_once
        await xadd(aredis, keys, request_id="unlucky", timeout_ms="30000")
        assert (await reply_of(aredis, keys, "unlucky"))["status"] == "ok"
        assert failures and svc.worker.metrics.reclaimed._value.get() == 1
    assert await pending_count(aredis, keys) == 0


async def test_dead_consumers_holding_nothing_leave_the_group_and_the_count_is_the_live_ones(
    service_factory, aredis: aioredis.Redis, keys: KeySpace
) -> None:
    """A SIGKILLed consumer stays in the group for ever unless someone removes it: the live
    ones remove those idle past DEAD_CONSUMER_IDLE_S with nothing pending, never one that
    still holds an entry (that one is reclaimed first)."""
    await xadd(aredis, keys, request_id="held-by-ghost", timeout_ms="600000")
    for priority in range(3):
        await aredis.xgroup_create(keys.stream(priority), "bales", id="0", mkstream=True)
    assert await aredis.xreadgroup("bales", "ghost-holding", {keys.stream(1): ">"}, count=1)
    for priority in range(3):  # joins every stream's group, takes nothing
        await aredis.xreadgroup("bales", "ghost-empty", {keys.stream(priority): ">"}, count=1)
    settings = {"dead_consumer_idle_s": 1, "trim_interval_s": 0.2, "claim_idle_ms": 600_000}
    async with service_factory(**settings) as svc:

        async def members() -> set[str]:
            return {
                c["name"].decode() for c in await aredis.xinfo_consumers(keys.stream(1), "bales")
            }

        # a live consumer idle on every stream may be removed too: its next read (every
        # READ_BLOCK_MS) puts it back, so the group ends up with the live ones
        expected = {"ghost-holding", svc.settings.consumer_name}
        await wait_for(lambda: _are(members, expected), timeout_s=30)
        assert (await aredis.xpending(keys.stream(1), "bales"))["pending"] == 1  # kept


async def _are(members, expected: set[str]) -> bool:
    return await members() == expected
