"""The service as a real process: start-up, graceful SIGTERM, the CLI, embedded Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp
import pytest
import redis
from bales_producer import KeySpace

from bales_stream.embedded_redis import free_port
from bales_stream.service import resolve_redis_url
from bales_stream.settings import load_settings

from .conftest import ROOT, wait_for

INPUT = json.dumps([0.5] * 128)


def service_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "KEY_"))}
    env.update(
        {
            "REDIS_URL": redis_url,
            "KEY_PREFIX": prefix,
            "WEIGHTS_DIR": str(ROOT / "weights"),
            "READ_BLOCK_MS": "200",
            **extra,
        }
    )
    return env


async def is_ready(port: int) -> bool:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/ready") as response,
        ):
            return response.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.slow
async def test_sigterm_during_traffic_loses_nothing(
    service_factory, redis_url, prefix, sync_redis
) -> None:
    keys = KeySpace(prefix)
    total = 3000
    pipe = sync_redis.pipeline(transaction=False)
    for i in range(total):
        pipe.xadd(
            keys.stream(i % 3),
            # a deadline far beyond a slow start-up: the test is about losing nothing
            {"request_id": f"g-{i}", "model_id": "stub_v1", "input": INPUT, "timeout_ms": "600000"},
        )
    pipe.execute()
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "consumer.py",
        cwd=ROOT,
        env=service_env(
            redis_url,
            prefix,
            PORT=str(port),
            CONSUMER_NAME="doomed",
            MAX_BATCH_SIZE="8",
            THREAD_POOL_SIZE="1",
        ),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        replies_so_far = lambda: len(sync_redis.keys(keys.reply("*")))  # noqa: E731
        await wait_for(lambda: replies_so_far() >= 100, timeout_s=60)
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0, stderr.decode()[-2000:]
    assert b"bales-stream stopped" in stderr
    answered_by_first = replies_so_far()
    assert answered_by_first < total  # it really was stopped mid-traffic
    consumers = {
        c["name"]: c["pending"]
        for s in keys.streams
        for c in sync_redis.xinfo_consumers(s, "bales")
    }
    assert consumers.get(b"doomed", 0) == 0  # everything it took, it answered and acked
    async with service_factory():  # a second consumer answers the rest
        await wait_for(lambda: replies_so_far() == total, timeout_s=60)
    documents = [json.loads(sync_redis.lindex(keys.reply(f"g-{i}"), 0)) for i in range(total)]
    assert all(d["status"] == "ok" for d in documents)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
async def test_the_consumer_process_starts_serves_and_stops(
    redis_url, prefix, sync_redis, signum
) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bales_stream",
        "serve",
        cwd=ROOT,
        env=service_env(redis_url, prefix, PORT=str(port)),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for(lambda: is_ready(port), timeout_s=60)
        keys = KeySpace(prefix)
        sync_redis.xadd(
            keys.stream(0), {"request_id": "proc-1", "model_id": "stub_v1", "input": INPUT}
        )
        popped = await asyncio.to_thread(sync_redis.blpop, [keys.reply("proc-1")], 10)
        assert popped is not None and json.loads(popped[1])["status"] == "ok"
        process.send_signal(signum)  # a graceful stop, whichever of these
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=15)
        assert b"bales-stream stopped" in stderr
    finally:
        if process.returncode is None:
            process.kill()
    assert process.returncode == 0


@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
async def test_the_process_runs_on_the_event_loop_the_setting_chooses(
    redis_url, prefix, choice, expected
) -> None:
    pytest.importorskip("uvloop")  # a dependency on Linux
    port = free_port()
    env = service_env(redis_url, prefix, PORT=str(port), EVENT_LOOP=choice)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bales_stream", "serve", cwd=ROOT, env=env
    )
    try:
        await wait_for(lambda: is_ready(port), timeout_s=60)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/health") as response,
        ):
            assert (await response.json())["event_loop"] == expected
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=15) == 0
    finally:
        if process.returncode is None:
            process.kill()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bales_stream", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_invalid_settings_stop_startup_naming_the_variable(redis_url, prefix) -> None:
    result = cli("config", env=service_env(redis_url, prefix, MAX_BATCH_SIZE="lots"))
    assert result.returncode == 2
    assert "MAX_BATCH_SIZE='lots'" in result.stderr


def test_config_masks_secrets(prefix) -> None:
    env = service_env("redis://:hunter2@127.0.0.1:1/0", prefix, SIDECAR_TOKEN="tok3n")
    result = cli("config", env=env)
    assert result.returncode == 0
    assert "hunter2" not in result.stdout and "tok3n" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["redis_url"] == "redis://:****@127.0.0.1:1/0" and shown["sidecar_token"] == "****"


async def test_send_and_info_against_a_running_service(service, redis_url, prefix) -> None:
    env = service_env(redis_url, prefix)
    sent = await asyncio.to_thread(cli, "send", "--priority", "0", env=env)
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["status"] == "ok"
    bad = await asyncio.to_thread(cli, "send", "--input", "[1, 2]", env=env)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["error"]["code"] == "invalid_request"
    info = await asyncio.to_thread(cli, "info", env=env)
    assert info.returncode == 0
    assert f"{prefix}:{{requests}}:p0" in info.stdout
    assert service.settings.consumer_name in info.stdout


def test_help_lists_the_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bales_stream", "--help"], capture_output=True, text=True, timeout=60
    )
    for command in ("serve", "send", "info", "check", "reload", "config"):
        assert command in result.stdout


def test_cli_reports_an_unreachable_redis(prefix) -> None:
    result = cli("info", env=service_env(f"redis://127.0.0.1:{free_port()}/0", prefix))
    assert result.returncode == 1
    assert "cannot reach Redis" in result.stderr


async def test_without_redis_url_an_embedded_redis_is_started(monkeypatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    settings = load_settings()
    url, server = await resolve_redis_url(settings, probe=("127.0.0.1", free_port()))
    assert server is not None
    try:
        assert redis.Redis.from_url(url).ping()
    finally:
        server.stop()


async def test_an_explicit_redis_url_is_used_as_is(redis_url) -> None:
    url, server = await resolve_redis_url(load_settings(redis_url=redis_url))
    assert (url, server) == (redis_url, None)


async def test_check_exits_0_when_ready_and_1_when_nothing_answers(service, redis_url, prefix):
    env = service_env(redis_url, prefix, PORT=str(service.sidecar.port))
    ready = await asyncio.to_thread(cli, "check", env=env)
    assert (ready.returncode, ready.stdout.strip()) == (0, "ready (200)")
    gone = await asyncio.to_thread(cli, "check", env={**env, "PORT": str(free_port())})
    assert gone.returncode == 1
    assert "cannot reach http://127.0.0.1:" in gone.stderr


async def test_reload_command_swaps_the_model_and_needs_the_token(
    service_factory, redis_url, prefix
):
    async with service_factory(SIDECAR_TOKEN="s3cret", WEIGHTS_DIR=str(ROOT / "weights")) as svc:
        env = service_env(redis_url, prefix, PORT=str(svc.sidecar.port))
        refused = await asyncio.to_thread(cli, "reload", "stub_v1", "stub_v2.pt", env=env)
        assert refused.returncode == 1
        assert "reload refused (401)" in refused.stderr
        env["SIDECAR_TOKEN"] = "s3cret"
        done = await asyncio.to_thread(cli, "reload", "stub_v1", "stub_v2.pt", env=env)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["version"].startswith("stub_v2-")
        assert svc.worker.registry.get("stub_v1").version.startswith("stub_v2-")
        wrong_hash = "0" * 64  # the file's hash is checked when one is named
        pinned = await asyncio.to_thread(
            cli, "reload", "stub_v1", "stub_v1.pt", "--sha256", wrong_hash, env=env
        )
        assert pinned.returncode == 1 and "reload refused (409)" in pinned.stderr


async def test_info_shows_the_age_of_the_oldest_waiting_request(redis_url, prefix) -> None:
    r = redis.Redis.from_url(redis_url)
    stream = f"{prefix}:{{requests}}:p1"
    r.xadd(stream, {"request_id": "old", "model_id": "stub_v1", "input": "[1]"}, id="1000-0")
    env = service_env(redis_url, prefix)
    info = await asyncio.to_thread(cli, "info", env=env)
    assert info.returncode == 0, info.stderr
    rows = [line.split() for line in info.stdout.splitlines()]
    row = next(row for row in rows if row[:2] == ["0", "p1"])
    assert row[:3] == ["0", "p1", stream]  # shard, priority, stream
    age_s = float(row[-1].rstrip("s"))
    assert age_s > 1_000_000  # entry id 1000 ms: enqueued in 1970
    assert row[3] == "1"  # length


def test_uvloop_asked_for_but_missing_is_a_clear_startup_error(monkeypatch) -> None:
    from bales_stream.service import EventLoopUnavailable, loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    assert loop_factory("auto") is None  # asyncio's own loop
    with pytest.raises(EventLoopUnavailable, match="EVENT_LOOP=uvloop, but uvloop is not"):
        loop_factory("uvloop")
