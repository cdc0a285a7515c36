"""Shared fixtures: one private redis-server per test session (never the shared one on
6379), a unique key prefix per test, and an in-process service (worker + sidecar)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from bales_producer import KeySpace

from bales_stream.embedded_redis import RedisServer, free_port
from bales_stream.metrics import Metrics
from bales_stream.service import build_worker
from bales_stream.settings import Settings, load_settings
from bales_stream.sidecar import Sidecar
from bales_stream.worker import Worker

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The unit tier (``-m unit``) must run with no redis-server: a unit test that asks,
    even through another fixture, for the test server is a collection error."""
    for item in items:
        if item.get_closest_marker("unit") and "redis_server" in getattr(item, "fixturenames", ()):
            raise pytest.UsageError(f"{item.nodeid} is marked unit but needs redis_server")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server on a free port, for the whole session."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests can run in parallel."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def keys(prefix: str) -> KeySpace:
    return KeySpace(prefix)


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, socket_timeout=None)
    yield client
    await client.aclose()


@pytest.fixture
def make_settings(redis_url: str, prefix: str) -> Callable[..., Settings]:
    """Settings for this test's key space; keyword overrides win."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "key_prefix": prefix,
            "consumer_name": f"c-{uuid.uuid4().hex[:8]}",
            "port": 0,
            "weights_dir": ROOT / "weights",
            "read_block_ms": 200,
            "shutdown_grace_s": 10,
        }
        values.update(overrides)
        return load_settings(**values)

    return build


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    """A private WEIGHTS_DIR: both stub versions, a junk file, and a symlink out of it."""
    directory = tmp_path / "weights"
    directory.mkdir()
    for name in ("stub_v1.pt", "stub_v2.pt"):
        shutil.copy(ROOT / "weights" / name, directory / name)
    (directory / "junk.pt").write_bytes(b"this is not a weights file")
    (tmp_path / "outside.pt").write_bytes((directory / "stub_v2.pt").read_bytes())
    (directory / "escape.pt").symlink_to(tmp_path / "outside.pt")
    return directory


@dataclass
class RunningService:
    """An in-process consumer with its sidecar."""

    worker: Worker
    sidecar: Sidecar
    settings: Settings

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.port}"


@pytest.fixture
def service_factory(
    make_settings: Callable[..., Settings],
) -> Callable[..., AbstractAsyncContextManager[RunningService]]:
    """``async with service_factory(**overrides) as svc``: a started worker and sidecar."""

    @contextlib.asynccontextmanager
    async def run(**overrides: Any) -> AsyncIterator[RunningService]:
        settings = make_settings(**overrides)
        client = aioredis.Redis.from_url(
            settings.redis_url.get_secret_value(), socket_timeout=None, socket_keepalive=True
        )
        worker = build_worker(settings, client, Metrics())
        sidecar = Sidecar(worker, "127.0.0.1", 0)
        await sidecar.start()
        await worker.start()
        try:
            yield RunningService(worker, sidecar, settings)
        finally:
            await worker.stop()
            await sidecar.stop()
            await client.aclose()

    return run


@pytest.fixture
async def service(
    service_factory: Callable[..., AbstractAsyncContextManager[RunningService]],
) -> AsyncIterator[RunningService]:
    """A running service with default settings in this test's key space."""
    async with service_factory() as running:
        yield running


async def wait_for(predicate: Callable[[], Any], timeout_s: float = 10.0) -> None:
    """Wait until ``predicate()`` (sync or async) is truthy; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = predicate()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def not_ready_sidecar(reasons: list[str]) -> AsyncIterator[int]:
    """A stand-in sidecar whose /ready answers 503 with ``reasons``; yields its port."""

    async def not_ready(_: web.Request) -> web.Response:
        return web.json_response({"ready": False, "reasons": reasons}, status=503)

    app = web.Application()
    app.router.add_get("/ready", not_ready)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield port
    finally:
        await runner.cleanup()
