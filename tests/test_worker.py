"""The consume loop against a real Redis: the reply contract, error codes, priorities."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from bales_producer import KeySpace

from .conftest import wait_for

STUB_INPUT = [0.25] * 128
REPLY_TIMEOUT_S = 10


async def xadd(
    redis: aioredis.Redis, keys: KeySpace, priority: int = 1, entry_id: str = "*", **fields: Any
) -> str:
    body = {"model_id": "stub_v1", "input": json.dumps(STUB_INPUT), **fields}
    added = await redis.xadd(keys.stream(priority), body, id=entry_id)
    return added.decode()


async def reply_of(redis: aioredis.Redis, keys: KeySpace, request_id: str) -> dict[str, Any]:
    popped = await redis.blpop([keys.reply(request_id)], timeout=REPLY_TIMEOUT_S)
    assert popped is not None, f"no reply for {request_id}"
    return json.loads(popped[1])


async def pending_count(redis: aioredis.Redis, keys: KeySpace, group: str = "bales") -> int:
    total = 0
    for stream in keys.streams:
        total += (await redis.xpending(stream, group))["pending"]
    return total


async def test_a_valid_request_gets_the_full_success_reply(service, aredis, keys) -> None:
    await xadd(aredis, keys, priority=0, request_id="ok-1")
    reply = await reply_of(aredis, keys, "ok-1")
    assert reply["status"] == "ok"
    assert reply["request_id"] == "ok-1" and reply["model_id"] == "stub_v1"
    assert reply["model_version"].startswith("stub_v1-")
    assert set(reply["result"]) == {"label", "confidence"}
    assert 0 <= reply["result"]["label"] < 10 and 0 < reply["result"]["confidence"] <= 1
    assert reply["batch_size"] >= 1 and reply["priority"] == 0
    assert 0 <= reply["queued_ms"] <= reply["latency_ms"] < 5000
    assert await pending_count(aredis, keys) == 0


async def test_the_reply_key_is_a_list_with_one_document_and_a_ttl(service, aredis, keys) -> None:
    await xadd(aredis, keys, request_id="ttl-1")
    await wait_for(lambda: aredis.exists(keys.reply("ttl-1")))  # LINDEX-style polling
    assert await aredis.llen(keys.reply("ttl-1")) == 1
    assert 0 < await aredis.ttl(keys.reply("ttl-1")) <= service.settings.reply_ttl_s
    assert json.loads(await aredis.lindex(keys.reply("ttl-1"), 0))["status"] == "ok"


async def test_the_answer_matches_the_model(service, aredis, keys) -> None:
    values = np.random.default_rng(7).standard_normal(128).astype(np.float32)
    await xadd(aredis, keys, request_id="f32-1", input=values.tobytes(), encoding="f32")
    reply = await reply_of(aredis, keys, "f32-1")
    model = service.worker.registry.get("stub_v1")
    expected = model.predict_array(values[None, :])[0]
    assert reply["result"]["label"] == expected["label"]
    assert reply["result"]["confidence"] == pytest.approx(expected["confidence"], rel=1e-5)


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        (
            {"input": json.dumps([1.0] * 12)},
            "invalid_request",
            "input has 12 values; stub_v1 expects 128",
        ),
        ({"model_id": "nope"}, "unknown_model", "not served"),
        ({"model_type": "embedding"}, "invalid_request", "classification"),
    ],
)
async def test_bad_requests_get_an_error_reply_and_are_acked(
    service, aredis, keys, fields, code, words
) -> None:
    await xadd(aredis, keys, request_id="bad-1", **fields)
    reply = await reply_of(aredis, keys, "bad-1")
    assert reply["status"] == "error"
    assert reply["error"]["code"] == code
    assert words in reply["error"]["message"]
    assert await pending_count(aredis, keys) == 0


async def test_an_expired_request_is_not_computed(service, aredis, keys) -> None:
    # An entry ID from 1970 means it was enqueued long before its 1000 ms deadline.
    await xadd(aredis, keys, entry_id="1-1", request_id="old-1", timeout_ms="1000")
    reply = await reply_of(aredis, keys, "old-1")
    assert reply["status"] == "error" and reply["error"]["code"] == "expired"
    assert "deadline passed" in reply["error"]["message"]
    ok = service.worker.metrics.requests.labels("stub_v1", "ok")._value.get()
    assert ok == 0


async def test_a_request_whose_model_was_unloaded_gets_internal(
    service_factory, aredis, keys
) -> None:
    async with service_factory(batch_window_ms=10_000, adaptive_window=False) as svc:
        await xadd(aredis, keys, request_id="orphan-1")
        await wait_for(lambda: len(svc.worker.batcher) == 1)
        svc.worker.registry._models.pop("stub_v1")
    # stopping drained the batcher: the request was answered, not dropped
    reply = await reply_of(aredis, keys, "orphan-1")
    assert reply["error"]["code"] == "internal" and "no longer served" in reply["error"]["message"]
    assert await pending_count(aredis, keys) == 0


async def test_an_entry_without_request_id_is_dead_lettered(service, aredis, keys) -> None:
    await aredis.xadd(keys.stream(1), {"model_id": "stub_v1", "input": "[1]"})
    await xadd(aredis, keys, request_id="after-dead")
    await reply_of(aredis, keys, "after-dead")
    dead = await aredis.xrange(keys.dead_letter)
    assert len(dead) == 1
    record = dead[0][1]
    assert record[b"reason"] == b"missing field request_id"
    assert record[b"field:model_id"] == b"stub_v1"
    assert await pending_count(aredis, keys) == 0


async def test_a_p0_request_does_not_wait_behind_a_p2_backlog(
    service_factory, aredis, keys
) -> None:
    inbox = keys.inbox("order")
    async with aredis.pipeline(transaction=False) as pipe:
        for i in range(400):
            pipe.xadd(
                keys.stream(2),
                {
                    "request_id": f"p2-{i}",
                    "model_id": "stub_v1",
                    "input": json.dumps(STUB_INPUT),
                    "reply_to": inbox,
                },
            )
        pipe.xadd(
            keys.stream(0),
            {
                "request_id": "urgent",
                "model_id": "stub_v1",
                "input": json.dumps(STUB_INPUT),
                "reply_to": inbox,
            },
        )
        await pipe.execute()
    async with service_factory(max_batch_size=8, thread_pool_size=1):
        order = [
            json.loads((await aredis.blpop([inbox], timeout=REPLY_TIMEOUT_S))[1])["request_id"]
            for _ in range(401)
        ]
    assert order.index("urgent") < 8, order[:16]


async def test_under_a_backlog_full_batches_share_a_handoff_and_stay_model_sized(
    service_factory, aredis, keys
) -> None:
    inbox = keys.inbox("grouped")
    values = np.linspace(-1, 1, 128, dtype="<f4").tobytes()
    async with aredis.pipeline(transaction=False) as pipe:
        for i in range(400):
            fields = {"request_id": f"g-{i}", "model_id": "stub_v1", "input": values}
            pipe.xadd(keys.stream(1), {**fields, "encoding": "f32", "reply_to": inbox})
        await pipe.execute()
    async with service_factory(max_batch_size=4, thread_pool_size=1) as svc:
        replies = [
            json.loads((await aredis.blpop([inbox], timeout=REPLY_TIMEOUT_S))[1])
            for _ in range(400)
        ]
        registry = svc.worker.metrics.registry
        model_calls = registry.get_sample_value("bales_batch_size_count")
        handoffs = registry.get_sample_value("bales_stage_seconds_count", {"stage": "model"})
    assert sorted(r["request_id"] for r in replies) == sorted(f"g-{i}" for i in range(400))
    assert {r["status"] for r in replies} == {"ok"}
    assert max(r["batch_size"] for r in replies) == 4  # each model call stays in its limit
    assert model_calls >= 100
    assert handoffs < model_calls  # but several went to the executor at once
    assert await pending_count(aredis, keys) == 0


async def test_a_p0_flood_does_not_starve_a_p2_request(service_factory, aredis, keys) -> None:
    inbox = keys.inbox("order")
    async with aredis.pipeline(transaction=False) as pipe:
        pipe.xadd(
            keys.stream(2),
            {
                "request_id": "patient",
                "model_id": "stub_v1",
                "input": json.dumps(STUB_INPUT),
                "reply_to": inbox,
            },
        )
        for i in range(3000):
            pipe.xadd(
                keys.stream(0),
                {
                    "request_id": f"p0-{i}",
                    "model_id": "stub_v1",
                    "input": json.dumps(STUB_INPUT),
                    "reply_to": inbox,
                },
            )
        await pipe.execute()
    async with service_factory(max_batch_size=8, thread_pool_size=1, priority_aging_ms=20):
        order = [
            json.loads((await aredis.blpop([inbox], timeout=REPLY_TIMEOUT_S))[1])["request_id"]
            for _ in range(3001)
        ]
    position = order.index("patient")
    assert 8 <= position < 1500, position  # not first (p0 preferred), not last (aged in)


async def test_stop_answers_everything_already_read(service_factory, aredis, keys) -> None:
    async with service_factory(
        batch_window_ms=10_000, max_batch_size=64, adaptive_window=False
    ) as svc:
        ids = [await xadd(aredis, keys, request_id=f"s-{i}") for i in range(20)]
        await wait_for(lambda: len(svc.worker.batcher) == 20)  # all waiting for the window
    # leaving the context stopped the worker: every request must have its reply
    for i in range(len(ids)):
        assert (await reply_of(aredis, keys, f"s-{i}"))["status"] == "ok"
    assert await pending_count(aredis, keys) == 0
