"""The ``bales-stream`` command as users of celery, rq or kubectl expect it: a version,
JSON output for scripts, completion, and one line with a hint for every expected failure."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import socket
import sys

import pytest
import redis

from bales_stream.embedded_redis import RedisServer, free_port

from .conftest import ROOT, not_ready_sidecar
from .test_service import cli, service_env

INFO_QUEUE_FIELDS = {"shard", "priority", "stream", "length", "lag", "pending", "oldest_age_s"}


def assert_one_line_error(stderr: str, *words: str) -> None:
    """No traceback: the last line is the error, and it says what to do."""
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("bales-stream: "), stderr
    for word in words:
        assert word in last, last


def test_version_is_the_installed_package_version() -> None:
    result = cli("--version", env=dict(os.environ))
    assert result.returncode == 0
    assert result.stdout.strip() == f"bales-stream {importlib.metadata.version('bales-stream')}"


def test_completion_offers_the_subcommands_and_their_options(tmp_path) -> None:
    """What ``eval "$(register-python-argcomplete bales-stream)"`` asks the command for."""
    out = tmp_path / "completions"
    for line, expected in (("bales-stream in", {"info"}), ("bales-stream info --", {"--json"})):
        env = {
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_IFS": "\n",
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
        }
        result = cli(env=env)
        assert result.returncode == 0, result.stderr
        assert expected <= set(out.read_text().split()), out.read_text()


async def test_info_json_has_the_documented_shape(redis_url, prefix) -> None:
    stream = f"{prefix}:{{requests}}:p1"
    redis.Redis.from_url(redis_url).xadd(
        stream, {"request_id": "old", "model_id": "stub_v1", "input": "[1]"}, id="1000-0"
    )
    result = await asyncio.to_thread(cli, "info", "--json", env=service_env(redis_url, prefix))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"group", "queues", "consumers"} and report["group"] == "bales"
    assert [q["priority"] for q in report["queues"]] == [0, 1, 2]
    assert all(set(q) == INFO_QUEUE_FIELDS | {"node"} for q in report["queues"])
    p1 = report["queues"][1]
    assert (p1["shard"], p1["stream"], p1["length"], p1["node"]) == ("0", stream, 1, None)
    assert p1["oldest_age_s"] > 1_000_000  # entry id 1000 ms: enqueued in 1970
    assert report["consumers"] == []  # nobody has read yet


async def test_check_json_says_ready_not_ready_with_reasons_and_unreachable(
    service, redis_url, prefix
) -> None:
    env = service_env(redis_url, prefix, PORT=str(service.sidecar.port))
    ready = await asyncio.to_thread(cli, "check", "--json", env=env)
    assert ready.returncode == 0
    assert json.loads(ready.stdout) | {"url": ""} == {
        "ready": True,
        "url": "",
        "status": 200,
        "reasons": [],
    }

    async with not_ready_sidecar(["models not loaded"]) as port:
        busy = await asyncio.to_thread(cli, "check", "--json", env={**env, "PORT": str(port)})
    assert busy.returncode == 1
    assert json.loads(busy.stdout)["status"] == 503
    assert json.loads(busy.stdout)["reasons"] == ["models not loaded"]
    gone = await asyncio.to_thread(cli, "check", "--json", env={**env, "PORT": str(free_port())})
    assert gone.returncode == 1
    verdict = json.loads(gone.stdout)
    assert verdict["ready"] is False and verdict["status"] is None
    assert "cannot reach http://127.0.0.1:" in verdict["reasons"][0]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("hello", ("JSON array", "'hello' is not JSON")),
        ('{"input": [1]}', ("JSON array", "got a JSON dict")),
        ("", ("JSON array",)),
    ],
)
def test_send_with_an_input_that_is_not_a_json_array_is_a_one_line_usage_error(
    redis_url, prefix, value: str, words: tuple[str, ...]
) -> None:
    result = cli("send", "--input", value or " ", env=service_env(redis_url, prefix))
    assert result.returncode == 2
    assert_one_line_error(result.stderr, *words)


def test_send_with_no_consumer_says_so_instead_of_a_traceback(redis_url, prefix) -> None:
    result = cli("send", "--timeout-s", "0.5", env=service_env(redis_url, prefix))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, "no reply within 0.5 s", "is a consumer running?")


@pytest.mark.parametrize("command", [("send",), ("info",), ("info", "--json")])
def test_an_unreachable_redis_is_one_line_naming_the_masked_url(prefix, command) -> None:
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    result = cli(*command, env=service_env(url, prefix))
    assert result.returncode == 1
    assert_one_line_error(
        result.stderr, "cannot reach Redis at redis://:****@127.0.0.1", "REDIS_URL"
    )
    assert "hunter2" not in result.stderr


def test_a_second_serve_on_a_taken_port_is_one_line_naming_the_port(redis_url, prefix) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", env=service_env(redis_url, prefix, PORT=str(port)))
    assert result.returncode == 1
    assert_one_line_error(result.stderr, f"port {port} on 127.0.0.1 is taken", "set PORT")


async def start_watch(redis_url: str, prefix: str) -> asyncio.subprocess.Process:
    """``bales-stream info --watch 0.1`` as a real process, its output into a pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bales_stream",
        "info",
        "--watch",
        "0.1",
        cwd=ROOT,
        env=service_env(redis_url, prefix),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_info_watch_refreshes_until_interrupted(redis_url, prefix) -> None:
    process = await start_watch(redis_url, prefix)
    assert process.stdout is not None
    frames = 0
    async with asyncio.timeout(30):
        while frames < 2:
            line = await process.stdout.readline()
            frames += "every 0.1 s, Ctrl-C to stop" in line.decode()
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        assert await process.wait() == 0


async def test_info_watch_into_a_pipe_is_plain_text_and_survives_a_redis_outage(prefix) -> None:
    server = RedisServer().start()
    process = await start_watch(server.url, prefix)
    assert process.stdout is not None
    seen: list[str] = []

    async def read_until(words: str) -> None:
        async with asyncio.timeout(30):
            while words not in (line := (await process.stdout.readline()).decode()):  # type: ignore[union-attr]
                assert line, "info --watch ended: " + "".join(seen)
                seen.append(line)

    try:
        await read_until("every 0.1 s, Ctrl-C to stop")
        await read_until(f"{prefix}:{{requests}}:p0")  # a report
        server.stop()
        await read_until("cannot reach Redis at redis://127.0.0.1")
        await read_until("(retrying)")
        await read_until("cannot reach Redis")  # still watching, still saying so
        server = RedisServer(port=server.port).start()
        await read_until(f"{prefix}:{{requests}}:p0")  # a report again, once Redis is back
        assert process.returncode is None
        assert not any("\x1b" in line for line in seen)  # no screen-control codes in a pipe
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(30):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        server.stop()
