"""Whatever a client writes into Redis, one entry affects that entry only: it is answered
(or dead-lettered) and acked, the consumer keeps reading, and /ready tells the truth.

One test per problem an outside review found, each against a live service on a real
redis-server, each followed by a canary request that must be answered.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

import aiohttp
from bales_producer import KeySpace

from bales_stream import service as service_module
from bales_stream.recovery import Recovery
from bales_stream.streams import StreamEntry, StreamStore

from .conftest import wait_for
from .test_worker import STUB_INPUT, pending_count, reply_of, xadd


async def nothing_pending(aredis, keys: KeySpace) -> bool:
    return await pending_count(aredis, keys) == 0


async def assert_still_serving(svc, aredis, keys: KeySpace) -> None:
    """A canary is answered, every task is up and /ready says 200."""
    canary = f"canary-{uuid.uuid4().hex[:8]}"
    await xadd(aredis, keys, request_id=canary)
    assert (await reply_of(aredis, keys, canary))["status"] == "ok"
    assert svc.worker.status.problems == []
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{svc.base_url}/ready") as response,
    ):
        assert response.status == 200, await response.text()


async def test_a_non_ascii_digit_timeout_is_refused_and_reading_goes_on(
    service, aredis, keys
) -> None:
    # "²".isdigit() is True but int("²") raises: it used to kill the read loop
    for request_id, digits in (("sq", "²"), ("arabic", "٣٠٠٠")):
        await xadd(aredis, keys, request_id=request_id, timeout_ms=digits)
        reply = await reply_of(aredis, keys, request_id)
        assert reply["error"]["code"] == "invalid_request"
        assert "timeout_ms" in reply["error"]["message"]
    await assert_still_serving(service, aredis, keys)
    assert await pending_count(aredis, keys) == 0


async def test_a_restart_under_the_same_name_answers_the_poison_it_left_pending(
    service_factory, aredis, keys
) -> None:
    await aredis.xgroup_create(keys.stream(1), "bales", id="0", mkstream=True)
    await xadd(aredis, keys, request_id="p-timeout", timeout_ms="²")
    await xadd(aredis, keys, request_id="p-encoding", encoding="f16")
    await aredis.xadd(keys.stream(1), {"request_id": "bad id!", "input": "[]"})
    await xadd(aredis, keys, request_id="p-good", timeout_ms="60000")
    await aredis.xreadgroup("bales", "pod-0", {keys.stream(1): ">"}, count=10)  # then it died
    async with service_factory(consumer_name="pod-0", claim_idle_ms=600_000) as svc:
        assert (await reply_of(aredis, keys, "p-timeout"))["error"]["code"] == "invalid_request"
        assert (await reply_of(aredis, keys, "p-encoding"))["error"]["code"] == "invalid_request"
        assert (await reply_of(aredis, keys, "p-good"))["status"] == "ok"
        await wait_for(lambda: aredis.xlen(keys.dead_letter))
        await assert_still_serving(svc, aredis, keys)
    assert await pending_count(aredis, keys) == 0


async def test_a_reply_to_inbox_of_another_type_is_skipped_and_the_entry_acked(
    service, aredis, keys
) -> None:
    inbox = keys.inbox("taken")
    await aredis.set(inbox, "somebody else's string")
    await xadd(aredis, keys, request_id="to-bad-inbox", reply_to=inbox)
    assert (await reply_of(aredis, keys, "to-bad-inbox"))["status"] == "ok"
    assert await aredis.get(inbox) == b"somebody else's string"
    assert await aredis.ttl(inbox) == -1  # no EXPIRE on a key that is not ours
    await wait_for(lambda: nothing_pending(aredis, keys))  # acked, not retried forever
    await assert_still_serving(service, aredis, keys)
    assert service.worker.metrics.undeliverable.labels("inbox")._value.get() == 1


async def test_a_reply_key_of_another_type_is_skipped_and_the_entry_acked(
    service, aredis, keys
) -> None:
    await aredis.hset(keys.reply("squatted"), "field", "value")
    inbox = keys.inbox("mine")
    await xadd(aredis, keys, request_id="squatted", reply_to=inbox)
    await wait_for(lambda: service.worker.metrics.undeliverable.labels("reply")._value.get())
    assert await aredis.hgetall(keys.reply("squatted")) == {b"field": b"value"}
    assert await aredis.ttl(keys.reply("squatted")) == -1
    await assert_still_serving(service, aredis, keys)
    assert await pending_count(aredis, keys) == 0


JUNK_RECORDS = {
    "stub_v1": "not json at all",
    "bad id!": json.dumps({"weights_path": "stub_v2.pt", "version": "x"}),
    "stub_v2": json.dumps({"weights_path": 5, "version": []}),
    "x" * 300: "{}",
}


async def test_junk_fleet_records_never_stop_a_consumer(service_factory, aredis, keys) -> None:
    await aredis.hset(keys.desired_models, mapping=JUNK_RECORDS)
    async with service_factory() as svc:  # starting with junk in the hash works
        for message in (b"\xff\xfe", b"[]", b'{"model_id": 7}', b'{"model_id": "stub_v1"}'):
            await aredis.publish(keys.control_channel, message)
        # a well-formed record naming a path the OS refuses (ENAMETOOLONG) is contained too
        long_path = json.dumps({"weights_path": "a" * 1000, "version": "v-long"})
        await aredis.hset(keys.desired_models, "stub_v1", long_path)
        await aredis.publish(keys.control_channel, b'{"model_id": "stub_v1"}')
        await wait_for(lambda: svc.worker.metrics.reloads.labels("stub_v1", "failed")._value.get())
        version = svc.worker.registry.get("stub_v1").version
        assert version.startswith("stub_v1-")  # still serving what it served
        # a record it cannot follow is a standing problem: /ready tells, until one it can
        [problem] = svc.worker.status.problems
        assert "cannot follow the fleet's reload of stub_v1 to v-long" in problem
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{svc.base_url}/ready") as response,
        ):
            assert response.status == 503 and problem in (await response.json())["reasons"]
        followable = json.dumps({"weights_path": "stub_v1.pt", "version": version})
        await aredis.hset(keys.desired_models, "stub_v1", followable)
        await aredis.publish(keys.control_channel, b'{"model_id": "stub_v1"}')
        await wait_for(lambda: not svc.worker.status.problems)
        await assert_still_serving(svc, aredis, keys)


async def test_oversized_fields_never_reach_the_consumer(service_factory, aredis, keys) -> None:
    async with service_factory(max_input_bytes=65_536) as svc:
        big = "[" + "1," * 100_000 + "1]"
        await xadd(aredis, keys, request_id="big-input", input=big)
        reply = await reply_of(aredis, keys, "big-input")
        assert reply["error"]["code"] == "invalid_request"
        assert f"input has {len(big)} bytes; the limit is 65536" in reply["error"]["message"]
        await xadd(aredis, keys, request_id="big-model", model_id="m" * 10_000)
        reply = await reply_of(aredis, keys, "big-model")
        assert "field model_id has 10000 bytes" in reply["error"]["message"]
        await aredis.xadd(keys.stream(1), {"request_id": "r" * 50_000, "input": "[1]"})
        await wait_for(lambda: aredis.xlen(keys.dead_letter))
        [(_, record)] = await aredis.xrange(keys.dead_letter)
        assert record[b"size:request_id"] == b"50000"  # a bounded copy: the size, not the bytes
        assert b"field:request_id" not in record
        assert "request_id (50000 bytes) was not read" in record[b"reason"].decode()
        await assert_still_serving(svc, aredis, keys)
    assert await pending_count(aredis, keys) == 0


async def script_reads(store: StreamStore) -> AsyncIterator[list[StreamEntry]]:
    """The entries each bounded (scripted) read path returns, one path after the other: the
    prioritised backlog read, the own-pending read and the reclaim."""
    for read in (
        lambda: store.read(count=64, share=8, block_ms=100),
        lambda: store.read_own_pending({}, 64),
        lambda: store.reclaim(0, "0-0", 0, 100),
    ):
        result = await read()
        yield result if isinstance(result, list) else result.entries


async def test_every_read_path_withholds_oversized_values(aredis, keys) -> None:
    store = StreamStore(aredis, keys, "bales", "reader", 60, max_input_bytes=1000)
    await store.ensure_groups()
    for i in range(3):
        await aredis.xadd(
            keys.stream(0), {"request_id": f"r{i}", "input": b"x" * 5000, "note": b"y" * 9000}
        )
    async for entries in script_reads(store):
        assert [e.fields for e in entries] == [{b"request_id": f"r{i}".encode()} for i in range(3)]
        assert all(e.withheld == {b"input": 5000, b"note": 9000} for e in entries)
    await aredis.xadd(keys.stream(2), {"request_id": "late", "input": b"x" * 5000})
    [entry] = await store.read(count=64, share=8, block_ms=100)  # the blocking read: ONE entry
    assert entry.fields == {b"request_id": b"late"} and entry.withheld == {b"input": 5000}


async def test_a_field_given_twice_counts_by_its_last_copy_on_every_read_path(aredis, keys) -> None:
    """The contract: a field given twice, the last value counts, whether the earlier or
    the later copy is the one too large to be read."""
    store = StreamStore(aredis, keys, "bales", "reader", 60, max_input_bytes=1000)
    await store.ensure_groups()
    big, small = b"x" * 5000, b"[1]"
    for request_id, first, last in (("big-last", small, big), ("small-last", big, small)):
        await aredis.execute_command(
            "XADD", keys.stream(0), "*", "request_id", request_id, "input", first, "input", last
        )
    async for entries in script_reads(store):
        by_id = {e.fields[b"request_id"].decode(): e for e in entries}
        assert by_id["big-last"].withheld == {b"input": 5000}
        assert b"input" not in by_id["big-last"].fields  # the earlier small copy is not used
        assert by_id["small-last"].fields[b"input"] == small
        assert not by_id["small-last"].withheld


async def test_an_entry_id_ahead_of_the_clock_is_clamped(service_factory, aredis, keys) -> None:
    async with service_factory(batch_window_ms=50, adaptive_window=False) as svc:
        future_ms = int(time.time() * 1000) + 3_600_000
        await xadd(aredis, keys, entry_id=f"{future_ms}-0", request_id="future", timeout_ms="60000")
        reply = await reply_of(aredis, keys, "future")
        assert reply["status"] == "ok"
        assert 0 <= reply["queued_ms"] <= reply["latency_ms"] < 10_000
        # a "*" entry after it gets an ID beyond the future one: its deadline still holds
        await xadd(aredis, keys, request_id="after-future", timeout_ms="1")
        reply = await reply_of(aredis, keys, "after-future")
        assert reply["error"]["code"] == "expired"
        assert svc.worker.metrics.future_entries._value.get() == 2
        await assert_still_serving(svc, aredis, keys)


async def test_a_non_finite_output_is_an_error_not_ok_with_null(service, aredis, keys) -> None:
    # valid float32 that overflows the model's arithmetic (inf - inf = NaN in the logits)
    await xadd(aredis, keys, request_id="overflow", input=json.dumps([3e38] * 128))
    await xadd(aredis, keys, request_id="fine", input=json.dumps(STUB_INPUT))
    reply = await reply_of(aredis, keys, "overflow")
    assert reply["status"] == "error" and reply["error"]["code"] == "invalid_output"
    assert "not finite" in reply["error"]["message"]
    assert (await reply_of(aredis, keys, "fine"))["status"] == "ok"
    await assert_still_serving(service, aredis, keys)


async def test_a_crashing_task_is_restarted_counted_and_shown_in_ready(
    service_factory, aredis, keys
) -> None:
    async with service_factory(claim_idle_ms=100) as svc:
        crashes = []

        async def broken_reclaim(*args) -> None:
            crashes.append(time.monotonic())
            raise RuntimeError("injected fault")

        svc.worker.streams.store(0).reclaim = broken_reclaim  # called every 50 ms
        restarts = svc.worker.metrics.task_restarts.labels("reclaim")
        await wait_for(lambda: restarts._value.get() >= 2)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{svc.base_url}/ready") as response,
        ):
            body = await response.json()
        assert response.status == 503
        assert any("task reclaim" in reason for reason in body["reasons"])
        await wait_for(svc.worker.failed.is_set, timeout_s=30)  # it cannot stay up
        assert len(crashes) == 5  # supervisor.MAX_CRASHES, then it gives up


async def test_the_service_exits_non_zero_when_a_task_cannot_stay_up(
    make_settings, monkeypatch
) -> None:
    async def broken_trim(self) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Recovery, "trim", broken_trim)
    settings = make_settings(trim_interval_s=0.01)
    status = await asyncio.wait_for(service_module.run_service(settings), timeout=60)
    assert status == service_module.EXIT_TASK_FAILED


async def test_the_largest_entry_id_there_is_breaks_no_loop(service, aredis, keys) -> None:
    largest = f"{2**64 - 1}-{2**64 - 1}"  # the stream can take no entry after it, ever
    await xadd(aredis, keys, priority=2, entry_id=largest, request_id="last-id")
    assert (await reply_of(aredis, keys, "last-id"))["status"] == "ok"
    await service.worker.recovery.trim()  # used to fail on every tick (ID overflow)
    assert service.worker.status.problems == []
    await assert_still_serving(service, aredis, keys)


async def test_a_dead_letter_stream_of_another_type_is_a_standing_problem(
    service, aredis, keys
) -> None:
    await aredis.set(keys.dead_letter, "not a stream")
    await aredis.xadd(keys.stream(1), {"request_id": "bad id!", "input": "[]"})
    await wait_for(lambda: service.worker.status.problems)
    assert "cannot take records" in service.worker.status.problems[0]
    assert await pending_count(aredis, keys) == 0  # acked all the same, never retried
    await aredis.delete(keys.dead_letter)
    await aredis.xadd(keys.stream(1), {"request_id": "bad id 2", "input": "[]"})
    await wait_for(lambda: not service.worker.status.problems)  # recorded again: cleared
    await assert_still_serving(service, aredis, keys)


async def test_a_request_stream_of_another_type_is_a_standing_problem(
    service_factory, aredis, keys
) -> None:
    async with service_factory(read_block_ms=50) as svc:
        await aredis.delete(keys.stream(0))
        await aredis.set(keys.stream(0), "an admin's mistake")
        await wait_for(lambda: svc.worker.status.problems, timeout_s=20)
        assert "fails on every try (ResponseError: WRONGTYPE" in svc.worker.status.problems[0]
        assert not svc.worker.status.ready
        await aredis.delete(keys.stream(0))  # the group is recreated (NOGROUP), reads resume
        await wait_for(lambda: not svc.worker.status.problems, timeout_s=20)
        await assert_still_serving(svc, aredis, keys)
