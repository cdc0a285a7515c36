"""Fleet-wide reload: asked of one consumer's sidecar, done by every consumer of the group,
remembered for consumers that start later, refused everywhere when it cannot load."""

from __future__ import annotations

from bales_producer import AsyncClient

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
