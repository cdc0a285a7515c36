"""Fleet-wide reload: asked of one consumer's sidecar, done by every consumer of the group,
remembered for consumers that start later, refused everywhere when it cannot load."""

from __future__ import annotations

import itertools
import logging
import re

from bales_producer import AsyncClient

from bales_stream.embedded_redis import RedisServer

from .conftest import wait_for
from .test_sidecar import post, reload_under_traffic


def version(svc) -> str:
    return svc.worker.registry.get("stub_v1").version


async def test_a_reload_on_one_sidecar_reaches_every_consumer(service_factory, weights_dir):
    async with (
        service_factory(weights_dir=weights_dir) as first,
        service_factory(weights_dir=weights_dir) as second,
    ):
        before = version(second)
        status, body = await post(
            first.base_url + "/models/stub_v1/reload", {"weights_path": "stub_v2.pt"}
        )
        assert status == 200 and body["previous_version"] == before
        assert body["version"].startswith("stub_v2-") and body["consumers_notified"] >= 2
        await wait_for(lambda: version(second) == body["version"])
        assert version(first) == body["version"]
        async with service_factory(weights_dir=weights_dir) as late:
            assert version(late) == body["version"]  # a consumer that starts later follows


async def test_a_failed_reload_changes_nothing_anywhere(service_factory, weights_dir, aredis, keys):
    async with (
        service_factory(weights_dir=weights_dir) as first,
        service_factory(weights_dir=weights_dir) as second,
    ):
        before = version(first), version(second)
        status, body = await post(
            first.base_url + "/models/stub_v1/reload", {"weights_path": "junk.pt"}
        )
        assert status == 400 and "does not load" in body["error"]
        assert (version(first), version(second)) == before
        assert await aredis.hgetall(keys.desired_models) == {}


async def test_reloads_under_traffic_across_two_consumers_lose_nothing(
    service_factory, weights_dir, redis_url, prefix
) -> None:
    async with (
        service_factory(weights_dir=weights_dir) as first,
        service_factory(weights_dir=weights_dir),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        await reload_under_traffic(
            client, first.base_url + "/models/stub_v1/reload", weights_dir, 4000, seed=5
        )


async def test_a_lost_control_channel_is_retried_with_growing_waits_and_comes_back(
    service_factory, weights_dir, caplog
) -> None:
    """During an outage the listener neither spins nor logs once a second: each try waits
    twice as long as the one before; once Redis is back it resubscribes and follows."""
    server = RedisServer().start()
    try:
        async with service_factory(redis_url=server.url, weights_dir=weights_dir) as svc:
            with caplog.at_level(logging.INFO, logger="bales_stream.control"):
                server.stop()
                await wait_for(lambda: len(_resubscribe_waits_s(caplog)) >= 4, timeout_s=30)
                waits_s = _resubscribe_waits_s(caplog)
                assert all(b == 2 * a for a, b in itertools.pairwise(waits_s[:4]))
                server = RedisServer(port=server.port).start()
                await wait_for(lambda: "control channel back" in caplog.text, timeout_s=60)
            status, _ = await post(
                svc.base_url + "/models/stub_v1/reload", {"weights_path": "stub_v2.pt"}
            )
            assert status == 200
    finally:
        server.stop()


def _resubscribe_waits_s(caplog) -> list[float]:
    return [
        float(match.group(1))
        for record in caplog.records
        if (match := re.search(r"resubscribing in ([0-9.]+) s", record.getMessage()))
    ]
