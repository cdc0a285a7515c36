"""The producer library in both flavours, against a running service."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
from bales_producer import (
    AsyncClient,
    Client,
    ClientCore,
    Expired,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    UnknownModel,
)

from .conftest import wait_for

INPUT = [0.1] * 128


def test_the_producer_library_imports_without_torch() -> None:
    code = (
        "import sys, bales_producer; print('torch' in sys.modules, 'bales_stream' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_core_builds_entries_without_io() -> None:
    request = ClientCore().build("stub_v1", INPUT, priority=0, timeout_s=2.5, request_id="abc")
    assert request.stream == "bales:{requests}:p0"
    assert request.fields["request_id"] == "abc"
    assert request.fields["encoding"] == "json"
    assert request.fields["timeout_ms"] == "2500"
    array = np.arange(128, dtype=np.float64)
    f32 = ClientCore().build("stub_v1", array)
    assert f32.fields["encoding"] == "f32"
    assert np.frombuffer(f32.fields["input"], "<f4").tolist() == array.tolist()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"priority": 3}, "priority must be 0..2"),
        ({"request_id": "bad id"}, "request_id"),
        ({"timeout_s": 0}, "timeout_s"),
    ],
)
def test_the_core_refuses_bad_arguments(kwargs, words) -> None:
    with pytest.raises(ValueError, match=words):
        ClientCore().build("stub_v1", INPUT, **kwargs)


def test_the_core_refuses_nan_and_strings() -> None:
    with pytest.raises(ValueError):
        ClientCore().build("stub_v1", [float("nan")] * 128)
    with pytest.raises(TypeError):
        ClientCore().build("stub_v1", "not a list")


async def test_sync_client_infer_submit_result_poll(service, redis_url, prefix) -> None:
    def exercise() -> None:
        with Client(redis_url, prefix=prefix) as client:
            reply = client.infer("stub_v1", INPUT, priority=0)
            assert reply["status"] == "ok" and reply["priority"] == 0
            request_id = client.submit("stub_v1", np.full(128, 0.1, dtype=np.float32))
            assert client.result(request_id)["result"] == reply["result"]
            request_id = client.submit("stub_v1", INPUT)
            polled = None
            for _ in range(1000):
                polled = client.poll(request_id)
                if polled is not None:
                    break
                client.redis.blpop(["never-" + prefix], timeout=0.01)
            assert polled is not None and polled["request_id"] == request_id
            with pytest.raises(InvalidRequest, match="input has 3 values; stub_v1 expects 128"):
                client.infer("stub_v1", [1, 2, 3])
            with pytest.raises(UnknownModel):
                client.infer("nope", INPUT)

    await asyncio.to_thread(exercise)


def test_sync_client_times_out_without_a_service(redis_url, prefix) -> None:
    with Client(redis_url, prefix=prefix) as client, pytest.raises(RequestTimeout):
        client.infer("stub_v1", INPUT, timeout_s=0.2)


async def test_async_client_infer_submit_result_poll(service, redis_url, prefix) -> None:
    async with AsyncClient(redis_url, prefix=prefix) as client:
        reply = await client.infer("stub_v1", INPUT, priority=2)
        assert reply["status"] == "ok" and reply["priority"] == 2
        request_id = await client.submit("stub_v1", INPUT)
        assert (await client.result(request_id))["request_id"] == request_id
        with pytest.raises(InvalidRequest):
            await client.infer("stub_v1", [1.0])
    # result() for an id this client did not submit waits on the reply key
    async with AsyncClient(redis_url, prefix=prefix) as submitter:
        request_id = await submitter.submit("stub_v1", INPUT)
    async with AsyncClient(redis_url, prefix=prefix) as other:
        assert (await other.result(request_id))["request_id"] == request_id


async def test_an_expired_request_raises_expired(service_factory, redis_url, prefix) -> None:
    async with (
        service_factory(batch_window_ms=50, adaptive_window=False),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        with pytest.raises(Expired, match="deadline passed"):
            await client.infer("stub_v1", INPUT, timeout_s=0.01)


async def test_async_client_times_out_without_a_service(redis_url, prefix) -> None:
    async with AsyncClient(redis_url, prefix=prefix) as client:
        with pytest.raises(RequestTimeout):
            await client.infer("stub_v1", INPUT, timeout_s=0.2)
        assert await client.poll("unknown-id") is None


async def test_ten_thousand_async_requests_all_get_correct_replies(
    service, redis_url, prefix
) -> None:
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((10_000, 128)).astype(np.float32)
    model = service.worker.registry.get("stub_v1")
    expected = [r["label"] for r in model.predict_array(inputs)]
    async with AsyncClient(redis_url, prefix=prefix) as client:
        replies = await asyncio.gather(
            *(
                client.infer("stub_v1", inputs[i], priority=i % 3, timeout_s=60)
                for i in range(10_000)
            )
        )
        connections = len(client.redis.connection_pool._in_use_connections) + len(
            client.redis.connection_pool._available_connections
        )
    assert [r["result"]["label"] for r in replies] == expected
    assert all(r["status"] == "ok" for r in replies)
    assert connections <= 4  # thousands in flight, a handful of connections
    assert max(r["batch_size"] for r in replies) > 1


async def fill_backlog(aredis, keys, priority: int, count: int) -> None:
    await aredis.xgroup_create(keys.stream(priority), "bales", id="0", mkstream=True)
    async with aredis.pipeline(transaction=False) as pipe:
        for i in range(count):
            pipe.xadd(keys.stream(priority), {"request_id": f"waiting-{i}"})
        await pipe.execute()


async def test_sync_client_refuses_to_enqueue_over_the_backlog_bound(
    aredis, keys, redis_url, prefix
) -> None:
    await fill_backlog(aredis, keys, 2, 50)

    def exercise() -> None:
        with Client(redis_url, prefix=prefix, max_backlog=10) as client:
            with pytest.raises(Overloaded) as refused:
                client.submit("stub_v1", INPUT, priority=2)
            assert (refused.value.priority, refused.value.backlog, refused.value.limit) == (
                2,
                50,
                10,
            )
            client.submit("stub_v1", INPUT, priority=0)  # another level is not affected
        with Client(redis_url, prefix=prefix) as unbounded:
            unbounded.submit("stub_v1", INPUT, priority=2)

    await asyncio.to_thread(exercise)
    assert await aredis.xlen(keys.stream(2)) == 51  # the refused one was never added
    assert await aredis.xlen(keys.stream(0)) == 1


async def test_async_client_refuses_to_enqueue_over_the_backlog_bound(
    aredis, keys, redis_url, prefix
) -> None:
    await fill_backlog(aredis, keys, 1, 30)
    async with AsyncClient(redis_url, prefix=prefix, max_backlog=10) as client:
        outcomes = await asyncio.gather(
            *(client.submit("stub_v1", INPUT, priority=1) for _ in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(o, Overloaded) for o in outcomes)
        assert client.in_flight == 0
        await client.submit("stub_v1", INPUT, priority=0)
    assert await aredis.xlen(keys.stream(1)) == 30


async def test_admission_reopens_when_the_backlog_drains(
    service_factory, aredis, keys, redis_url, prefix
) -> None:
    await fill_backlog(aredis, keys, 1, 30)
    async with AsyncClient(redis_url, prefix=prefix, max_backlog=10) as client:
        with pytest.raises(Overloaded):
            await client.submit("stub_v1", INPUT, priority=1)
        async with service_factory():  # a consumer drains the backlog

            async def admitted() -> bool:
                try:
                    await client.infer("stub_v1", INPUT, priority=1)
                except Overloaded:
                    return False
                return True

            await wait_for(admitted)


def test_request_ids_are_unguessable_and_unique() -> None:
    from bales_producer.core import new_request_id

    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    # no shared prefix or counter: knowing one id tells nothing of the next
    assert len({i[:8] for i in ids}) > 9_900
