"""The HTTP sidecar: health, readiness, metrics and hot reload (also under traffic)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import redis.asyncio as aioredis
import yaml
from bales_producer import AsyncClient

from bales_stream.embedded_redis import RedisServer
from bales_stream.metrics import Metrics
from bales_stream.models import load_stub_file
from bales_stream.service import build_worker
from bales_stream.sidecar import Sidecar
from bales_stream.worker import Worker

from .conftest import ROOT, wait_for


async def get(url: str) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def post(url: str, body: object, token: str | None = None) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


async def test_health_reports_models_queues_and_identity(service) -> None:
    status, body = await get(service.base_url + "/health")
    assert status == 200
    assert body["status"] == "ok" and body["ready"] is True
    assert body["consumer"] == service.settings.consumer_name and body["group"] == "bales"
    assert body["redis"]["reachable"] is True
    assert body["models"]["stub_v1"]["version"].startswith("stub_v1-")
    assert [q["priority"] for q in body["queues"]] == [0, 1, 2]
    assert all({"length", "lag", "pending", "stream"} <= set(q) for q in body["queues"])


async def test_ready_is_503_until_the_worker_has_started(make_settings, redis_url) -> None:
    settings = make_settings()
    client = aioredis.Redis.from_url(redis_url)
    worker = build_worker(settings, client, Metrics())
    sidecar = Sidecar(worker, "127.0.0.1", 0)
    await sidecar.start()
    base = f"http://127.0.0.1:{sidecar.port}"
    try:
        status, body = await get(base + "/ready")
        assert status == 503 and "models not loaded" in body["reasons"]
        await worker.start()
        assert (await get(base + "/ready"))[0] == 200
        await worker.stop()
        status, body = await get(base + "/ready")
        assert status == 503 and "shutting down" in body["reasons"]
    finally:
        await sidecar.stop()
        await client.aclose()


async def test_metrics_expose_the_required_series(service, redis_url, prefix) -> None:
    async with AsyncClient(redis_url, prefix=prefix) as client:
        await client.infer("stub_v1", [0.0] * 128)
    status, text = await get(service.base_url + "/metrics")
    assert status == 200
    assert 'bales_requests_total{model_id="stub_v1",status="ok"} 1.0' in text
    for name in (
        "bales_request_latency_seconds_bucket",
        "bales_batch_size_bucket",
        'bales_queue_depth{priority="0",shard="0"}',
        'bales_pending{priority="2",shard="0"}',
    ):
        assert name in text


async def test_metrics_can_be_disabled(service_factory) -> None:
    async with service_factory(enable_prometheus=False) as svc:
        assert (await get(svc.base_url + "/metrics"))[0] == 404


async def test_reload_swaps_the_version_and_replies_carry_it(
    service_factory, weights_dir, redis_url, prefix
) -> None:
    async with service_factory(weights_dir=weights_dir) as svc:
        status, body = await post(
            svc.base_url + "/models/stub_v1/reload", {"weights_path": "stub_v2.pt"}
        )
        assert status == 200 and body["version"].startswith("stub_v2-")
        async with AsyncClient(redis_url, prefix=prefix) as client:
            reply = await client.infer("stub_v1", [0.3] * 128)
        assert reply["model_version"] == body["version"]
        health = (await get(svc.base_url + "/health"))[1]
        assert health["models"]["stub_v1"]["version"] == body["version"]


@pytest.mark.parametrize(
    ("model_id", "body", "status", "words"),
    [
        ("stub_v1", {"weights_path": "../outside.pt"}, 400, "outside WEIGHTS_DIR"),
        ("stub_v1", {"weights_path": "/etc/passwd"}, 400, "outside WEIGHTS_DIR"),
        ("stub_v1", {"weights_path": "escape.pt"}, 400, "outside WEIGHTS_DIR"),
        ("stub_v1", {"weights_path": "missing.pt"}, 404, "does not exist"),
        ("stub_v1", {"weights_path": "junk.pt"}, 400, "does not load"),
        ("stub_v1", {"path": "stub_v2.pt"}, 400, "weights_path"),
        ("nope", {"weights_path": "stub_v2.pt"}, 404, "not served"),
    ],
)
async def test_bad_reloads_are_refused_and_the_old_model_stays(
    service_factory, weights_dir, model_id, body, status, words
) -> None:
    async with service_factory(weights_dir=weights_dir) as svc:
        before = svc.worker.registry.get("stub_v1").version
        got_status, got = await post(svc.base_url + f"/models/{model_id}/reload", body)
        assert got_status == status
        assert words in got["error"]
        assert svc.worker.registry.get("stub_v1").version == before


async def test_reload_requires_the_token_when_one_is_set(service_factory, weights_dir) -> None:
    async with service_factory(weights_dir=weights_dir, sidecar_token="s3cret") as svc:
        url = svc.base_url + "/models/stub_v1/reload"
        assert (await post(url, {"weights_path": "stub_v2.pt"}))[0] == 401
        assert (await post(url, {"weights_path": "stub_v2.pt"}, token="wrong"))[0] == 401
        assert (await post(url, {"weights_path": "stub_v2.pt"}, token="s3cret"))[0] == 200
        assert "s3cret" not in repr(svc.settings)


@contextlib.asynccontextmanager
async def exposed_service(make_settings, **overrides) -> AsyncIterator[tuple[Worker, str]]:
    """A started worker whose sidecar binds HOST=0.0.0.0 (all interfaces), port 0; yields
    the worker and the sidecar's base URL (reached through 127.0.0.1)."""
    settings = make_settings(host="0.0.0.0", **overrides)
    client = aioredis.Redis.from_url(settings.redis_url.get_secret_value())
    worker = build_worker(settings, client, Metrics())
    sidecar = Sidecar(worker, settings.host, 0)
    await sidecar.start()
    await worker.start()
    try:
        yield worker, f"http://127.0.0.1:{sidecar.port}"
    finally:
        await worker.stop()
        await sidecar.stop()
        await client.aclose()


@pytest.mark.parametrize("token", [None, "", "   "])
async def test_an_exposed_sidecar_without_a_token_refuses_reload_and_serves_probes(
    make_settings, weights_dir, caplog, token
) -> None:
    with caplog.at_level(logging.WARNING, logger="bales_stream.sidecar"):
        async with exposed_service(make_settings, weights_dir=weights_dir, sidecar_token=token) as (
            worker,
            base,
        ):
            before = worker.registry.get("stub_v1").version
            for bearer in (None, "", "   "):
                status, body = await post(
                    base + "/models/stub_v1/reload", {"weights_path": "stub_v2.pt"}, bearer
                )
                assert status == 403 and "set SIDECAR_TOKEN" in body["error"]
            assert worker.registry.get("stub_v1").version == before
            for path in ("/health", "/ready", "/metrics"):
                assert (await get(base + path))[0] == 200, path
    warnings = [r for r in caplog.records if "SIDECAR_TOKEN is not set" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_an_exposed_sidecar_with_a_token_reloads_for_its_bearer(
    make_settings, weights_dir
) -> None:
    async with exposed_service(make_settings, weights_dir=weights_dir, sidecar_token="t0k") as (
        worker,
        base,
    ):
        url = base + "/models/stub_v1/reload"
        assert (await post(url, {"weights_path": "stub_v2.pt"}))[0] == 401
        assert (await post(url, {"weights_path": "stub_v2.pt"}, token="t0k"))[0] == 200
        assert worker.registry.get("stub_v1").version.startswith("stub_v2-")


def test_deployments_take_the_token_from_their_environment() -> None:
    """The image binds 0.0.0.0 and bakes no token; compose refuses to start without one
    (``${VAR:?message}``); Kubernetes reads it from a Secret key that must exist."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "HOST=0.0.0.0" in dockerfile and "SIDECAR_TOKEN=" not in dockerfile
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    token = compose["services"]["consumer"]["environment"]["SIDECAR_TOKEN"]
    assert token.startswith("${SIDECAR_TOKEN:?") and token.endswith("}")
    deployment = next(
        d
        for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    secret = env["SIDECAR_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] and secret["key"] and not secret.get("optional", False)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned_models_file(weights_dir: Path) -> Path:
    """A models file serving stub_v1 from stub_v1.pt, pinned to that file's sha256."""
    path = weights_dir / "pinned.toml"
    pin = sha256_of(weights_dir / "stub_v1.pt")
    path.write_text(
        '[[models]]\nmodel_id = "stub_v1"\nformat = "state_dict"\narchitecture = "stub"\n'
        f'file = "stub_v1.pt"\ninput_shape = [128]\nsha256 = "{pin}"\n'
    )
    return path


async def test_a_pinned_model_reloads_only_files_whose_sha256_an_admin_named(
    service_factory, weights_dir
) -> None:
    v2_sha256 = sha256_of(weights_dir / "stub_v2.pt")
    async with service_factory(
        weights_dir=weights_dir, models_config=pinned_models_file(weights_dir)
    ) as svc:
        url = svc.base_url + "/models/stub_v1/reload"
        before = svc.worker.registry.get("stub_v1").version
        status, body = await post(url, {"weights_path": "stub_v2.pt"})
        assert status == 409
        pin = sha256_of(weights_dir / "stub_v1.pt")
        assert "stub_v2.pt" in body["error"] and pin in body["error"] and v2_sha256 in body["error"]
        status, body = await post(url, {"weights_path": "stub_v2.pt", "sha256": pin})
        assert status == 409 and "the reload request expects" in body["error"]
        assert svc.worker.registry.get("stub_v1").version == before
        status, body = await post(url, {"weights_path": "stub_v2.pt", "sha256": v2_sha256})
        assert status == 200 and body["version"].startswith("stub_v2-")
        status, body = await post(url, {"weights_path": "stub_v1.pt"})  # the pinned file
        assert status == 200 and body["version"] == before


@pytest.mark.parametrize("sha256", ["A" * 64, "a" * 63, "g" * 64, 12, ""])
async def test_a_malformed_sha256_in_a_reload_is_refused(service, sha256) -> None:
    status, body = await post(
        service.base_url + "/models/stub_v1/reload",
        {"weights_path": "stub_v2.pt", "sha256": sha256},
    )
    assert status == 400 and "64 lowercase hex" in body["error"]


async def test_an_unpinned_model_checks_a_sha256_given_in_the_reload(
    service_factory, weights_dir
) -> None:
    async with service_factory(weights_dir=weights_dir) as svc:
        url = svc.base_url + "/models/stub_v1/reload"
        wrong = sha256_of(weights_dir / "stub_v1.pt")
        assert (await post(url, {"weights_path": "stub_v2.pt", "sha256": wrong}))[0] == 409
        right = sha256_of(weights_dir / "stub_v2.pt")
        assert (await post(url, {"weights_path": "stub_v2.pt", "sha256": right}))[0] == 200


async def test_a_pinned_reload_that_names_the_hash_reaches_every_consumer(
    service_factory, weights_dir, aredis, keys
) -> None:
    """The fleet record carries the admin's sha256, so every pinned consumer follows (now,
    or when it starts later); a record whose file does not match it is refused everywhere."""
    models = pinned_models_file(weights_dir)
    v2_sha256 = sha256_of(weights_dir / "stub_v2.pt")
    async with (
        service_factory(weights_dir=weights_dir, models_config=models) as first,
        service_factory(weights_dir=weights_dir, models_config=models) as second,
    ):
        status, body = await post(
            first.base_url + "/models/stub_v1/reload",
            {"weights_path": "stub_v2.pt", "sha256": v2_sha256},
        )
        assert status == 200 and body["consumers_notified"] >= 2
        await wait_for(lambda: second.worker.registry.get("stub_v1").version == body["version"])
        record = json.loads(await aredis.hget(keys.desired_models, "stub_v1"))
        assert record["sha256"] == v2_sha256
        async with service_factory(weights_dir=weights_dir, models_config=models) as late:
            assert late.worker.registry.get("stub_v1").version == body["version"]
        # a record naming the pinned file's hash for another file is refused by everyone
        forged = {"weights_path": "stub_v1.pt", "version": "forged", "sha256": v2_sha256}
        await aredis.hset(keys.desired_models, "stub_v1", json.dumps(forged))
        await aredis.publish(keys.control_channel, json.dumps({"model_id": "stub_v1"}))
        failed = second.worker.metrics.reloads.labels("stub_v1", "failed")
        await wait_for(lambda: failed._value.get() >= 1)
        assert second.worker.registry.get("stub_v1").version == body["version"]


async def reload_under_traffic(
    client: AsyncClient, reload_url: str, weights_dir: Path, count: int, seed: int
) -> None:
    """Send ``count`` requests in waves of 100; reload to stub_v2 after a third of the
    replies and back to stub_v1 after two thirds. Asserts zero errors, zero lost, both
    versions seen, and every reply's label equal to the version it names."""
    inputs = np.random.default_rng(seed).standard_normal((count, 128)).astype(np.float32)
    expected = {}
    for name in ("stub_v1", "stub_v2"):
        model = load_stub_file("stub_v1", weights_dir / f"{name}.pt")
        expected[model.version] = [r["label"] for r in model.predict_array(inputs)]
    replies: list[dict] = []

    async def traffic() -> None:
        for start in range(0, count, 100):
            chunk = range(start, min(start + 100, count))
            replies.extend(
                await asyncio.gather(
                    *(client.infer("stub_v1", inputs[i], timeout_s=30) for i in chunk)
                )
            )

    sender = asyncio.create_task(traffic())
    for after_replies, target in ((count // 3, "stub_v2.pt"), (2 * count // 3, "stub_v1.pt")):
        await wait_for(lambda n=after_replies: len(replies) >= n or sender.done())
        assert (await post(reload_url, {"weights_path": target}))[0] == 200
    await sender
    assert len(replies) == count
    assert all(r["status"] == "ok" for r in replies)
    assert {r["model_version"].split("-")[0] for r in replies} == {"stub_v1", "stub_v2"}
    for i, reply in enumerate(replies):
        assert reply["result"]["label"] == expected[reply["model_version"]][i]


async def test_reload_under_traffic_loses_nothing_and_switches_versions(
    service_factory, weights_dir, redis_url, prefix
) -> None:
    async with (
        service_factory(weights_dir=weights_dir) as svc,
        AsyncClient(redis_url, prefix=prefix) as client,
    ):
        await reload_under_traffic(
            client, svc.base_url + "/models/stub_v1/reload", weights_dir, 3000, seed=1
        )


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 30_000 + b"]" * 30_000,  # nesting deeper than the JSON decoder goes
        b'{"weights_path": "stub_v2.pt", "sha256": ' + b"9" * 20_000 + b"}",
    ],
)
async def test_a_pathological_reload_body_is_a_400_not_a_500(service, body) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(service.base_url + "/models/stub_v1/reload", data=body) as response,
    ):
        assert response.status == 400, await response.text()
        assert (
            "body must be" in (await response.json())["error"]
            or "sha256" in (await response.json())["error"]
        )


async def test_labelled_counters_start_at_zero_so_the_first_failed_reload_is_an_increase(
    service_factory, weights_dir
) -> None:
    """A series born at 1 reads as no change to increase()/rate(): every outcome of every
    served model (and of unknown models) is exported at 0 before its first event."""
    (weights_dir / "broken.pt").write_bytes(b"not a weights file")
    async with service_factory(weights_dir=weights_dir) as svc:
        text = (await get(svc.base_url + "/metrics"))[1]
        for model in ("stub_v1", "_unknown"):
            for status in ("ok", "invalid_request", "unknown_model", "expired", "internal"):
                assert f'bales_requests_total{{model_id="{model}",status="{status}"}} 0.0' in text
        assert 'bales_reloads_total{model_id="stub_v1",outcome="failed"} 0.0' in text
        got_status, _ = await post(
            svc.base_url + "/models/stub_v1/reload", {"weights_path": "broken.pt"}
        )
        assert got_status >= 400
        text = (await get(svc.base_url + "/metrics"))[1]
        assert 'bales_reloads_total{model_id="stub_v1",outcome="failed"} 1.0' in text
        assert 'bales_reloads_total{model_id="stub_v1",outcome="ok"} 0.0' in text


async def test_metrics_speak_openmetrics_and_gzip_when_asked_and_carry_process_series(
    service,
) -> None:
    url = service.base_url + "/metrics"
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(url, headers={"Accept-Encoding": "identity"}) as plain:
            text = await plain.text()
            assert plain.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        headers = {
            "Accept": "application/openmetrics-text; version=1.0.0",
            "Accept-Encoding": "identity",
        }
        async with session.get(url, headers=headers) as open_metrics:
            assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await open_metrics.text()).endswith("# EOF\n")
        async with session.get(url, headers={"Accept-Encoding": "gzip"}) as zipped:
            assert zipped.headers["Content-Encoding"] == "gzip"
            assert gzip.decompress(await zipped.read()).startswith(b"# HELP")
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert series in text
    assert 'python_gc_collections_total{generation="0"}' in text


async def test_queue_gauges_go_unknown_while_redis_is_down_instead_of_freezing(
    service_factory,
) -> None:
    """A frozen backlog gauge would keep an alert quiet (or firing) through an outage."""
    server = RedisServer().start()
    try:
        async with service_factory(redis_url=server.url) as svc:
            await wait_for(lambda: _has(svc.base_url, "bales_group_consumers 1.0"))  # joined
            text = (await get(svc.base_url + "/metrics"))[1]
            assert 'bales_queue_depth{priority="1",shard="0"} 0.0' in text
            server.stop()
            text = (await get(svc.base_url + "/metrics"))[1]
            assert (
                "bales_queue_depth{" not in text and "bales_queue_oldest_age_seconds{" not in text
            )
            assert "bales_group_consumers NaN" in text
            server = RedisServer(port=server.port).start()
            await wait_for(lambda: _has(svc.base_url, 'bales_queue_depth{priority="1",shard="0"}'))
    finally:
        server.stop()


async def _has(base_url: str, series: str) -> bool:
    return series in (await get(base_url + "/metrics"))[1]
