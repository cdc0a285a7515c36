"""Fleet-wide reload: asked of one consumer's sidecar, done by every consumer of the group,
remembered for consumers that start later, refused everywhere when it cannot load."""

from __future__ import annotations

import asyncio

import numpy as np
from bales_producer import AsyncClient

from bales_stream.models import load_stub_file

from .conftest import wait_for
from .test_sidecar import post


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
    inputs = np.random.default_rng(5).standard_normal((4000, 128)).astype(np.float32)
    expected = {}
    for name in ("stub_v1", "stub_v2"):
        model = load_stub_file("stub_v1", weights_dir / f"{name}.pt")
        expected[model.version] = [r["label"] for r in model.predict(inputs)]
    async with (
        service_factory(weights_dir=weights_dir) as first,
        service_factory(weights_dir=weights_dir),
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        replies: list[dict] = []

        async def traffic() -> None:
            for start in range(0, len(inputs), 200):
                replies.extend(
                    await asyncio.gather(
                        *(
                            client.infer("stub_v1", inputs[i], timeout_s=30)
                            for i in range(start, start + 200)
                        )
                    )
                )

        sender = asyncio.create_task(traffic())
        url = first.base_url + "/models/stub_v1/reload"
        for after, target in ((1000, "stub_v2.pt"), (2600, "stub_v1.pt")):
            await wait_for(lambda n=after: len(replies) >= n or sender.done())
            assert (await post(url, {"weights_path": target}))[0] == 200
        await sender
    assert len(replies) == len(inputs) and all(r["status"] == "ok" for r in replies)
    assert {r["model_version"].split("-")[0] for r in replies} == {"stub_v1", "stub_v2"}
    for i, reply in enumerate(replies):
        assert reply["result"]["label"] == expected[reply["model_version"]][i]
