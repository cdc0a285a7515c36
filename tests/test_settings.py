"""Settings: the seed's names and defaults, strict parsing, masked secrets (also in the
output of a real ``bales-stream config`` and the start-up log of a real ``serve``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from bales_stream.settings import SettingsError, is_loopback, load_settings, mask_url

from .conftest import ROOT

SEED_DEFAULTS = {
    "redis_url": None,
    "max_batch_size": 32,
    "batch_window_ms": 5.0,
    "batcher_timeout_s": 5.0,
    "default_model_id": "stub_v1",
    "thread_pool_size": 4,
    "intra_op_threads": 1,
    "event_loop": "auto",
    "port": 8000,
    "log_level": "info",
    "enable_prometheus": True,
    "priority_levels": 3,
    "reply_ttl_s": 60,
    "consumer_group": "bales",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:
    """No setting in the environment, and a working directory without a ``.env``."""
    for name in SEED_DEFAULTS:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_defaults_match_the_seed(clean_env) -> None:
    settings = load_settings()
    for name, expected in SEED_DEFAULTS.items():
        if expected is not None:
            assert getattr(settings, name) == expected, name
    assert settings.redis_url.get_secret_value() == "redis://localhost:6379/0"
    assert settings.host == "127.0.0.1"  # not reachable from elsewhere unless asked
    assert settings.keys.streams == [
        "bales:{requests}:p0",
        "bales:{requests}:p1",
        "bales:{requests}:p2",
    ]


def test_environment_variables_are_read(clean_env) -> None:
    clean_env.setenv("MAX_BATCH_SIZE", "64")
    clean_env.setenv("ENABLE_PROMETHEUS", "false")
    clean_env.setenv("LOG_LEVEL", "DEBUG")
    clean_env.setenv("PRIORITY_LEVELS", "5")
    settings = load_settings()
    assert settings.max_batch_size == 64 and settings.enable_prometheus is False
    assert settings.log_level == "debug" and len(settings.keys.streams) == 5


def test_a_dotenv_file_in_the_working_directory_is_read_and_the_environment_wins(
    clean_env, tmp_path
) -> None:
    (tmp_path / ".env").write_text(
        "# comments and blank lines are fine\n\nMAX_BATCH_SIZE=7\nPORT=9100\n"
        "REDIS_URL=redis://:dotenv-secret@redis.internal:6380/0\n"
    )
    clean_env.setenv("PORT", "9200")
    settings = load_settings()
    assert settings.max_batch_size == 7  # from .env
    assert settings.port == 9200  # the environment wins
    assert settings.redis_url_is_explicit and "dotenv-secret" not in settings.redis_url_masked
    (tmp_path / ".env").write_text("MAX_BATCH_SIZE=0\n")
    with pytest.raises(SettingsError, match="MAX_BATCH_SIZE"):
        load_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_BATCH_SIZE", "0"),
        ("MAX_BATCH_SIZE", "ten"),
        ("ENABLE_PROMETHEUS", "maybe"),
        ("BATCH_WINDOW_MS", "-1"),
        ("PORT", "70000"),
        ("LOG_LEVEL", "loud"),
        ("KEY_PREFIX", "has space"),
        ("THREAD_POOL_SIZE", "0"),
    ],
)
def test_invalid_values_name_the_variable(clean_env, name: str, value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError, match=f"{name}='{value}'"):
        load_settings()


def test_secrets_are_masked(clean_env) -> None:
    clean_env.setenv("REDIS_URL", "redis://user:pa55@db:6379/1")
    clean_env.setenv("SIDECAR_TOKEN", "t0ken")
    settings = load_settings()
    view = settings.public_view()
    assert view["redis_url"] == "redis://user:****@db:6379/1"
    assert view["sidecar_token"] == "****"
    assert "pa55" not in repr(settings) and "t0ken" not in repr(settings)


def test_mask_url_leaves_password_free_urls_alone() -> None:
    assert mask_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


# Every URL form redis-py takes a password in (PW stands for it), and what is shown instead.
PASSWORD_URLS = [
    ("redis://user:PW@db:6379/1", "redis://user:****@db:6379/1"),
    ("redis://:PW@db:6379/0", "redis://:****@db:6379/0"),
    (
        "rediss://bales:PW@db:6380/0?ssl_ca_certs=/etc/ca.pem",
        "rediss://bales:****@db:6380/0?ssl_ca_certs=/etc/ca.pem",
    ),
    ("unix:///run/redis.sock?password=PW&db=2", "unix:///run/redis.sock?password=****&db=2"),
    ("unix://:PW@/run/redis.sock", "unix://:****@/run/redis.sock"),
    ("redis://db:6379/0?password=PW", "redis://db:6379/0?password=****"),
    ("redis://db?db=1&PASSWORD=PW&client_name=x", "redis://db?db=1&PASSWORD=****&client_name=x"),
    ("redis+cluster://consumer:PW@node1:7000", "redis+cluster://consumer:****@node1:7000"),
    (
        "rediss+cluster://:PW@node1:7000?ssl_password=PW",
        "rediss+cluster://:****@node1:7000?ssl_password=****",
    ),
    ("redis://:PW@[::1]:6379/0", "redis://:****@[::1]:6379/0"),
    ("redis://:PW%40x@db/0", "redis://:****@db/0"),
    ("redis://:PW#x@db/0", "redis://****"),  # a raw # or ? in a password: unparseable
    ("redis://:PW?x@db/0", "redis://****"),
]


@pytest.mark.parametrize(("url", "shown"), PASSWORD_URLS)
def test_mask_url_hides_the_password_in_every_url_form(url: str, shown: str) -> None:
    assert mask_url(url) == shown


@pytest.mark.parametrize(
    "url",
    ["redis://localhost:6379/0", "rediss://db:6380/0?ssl_ca_certs=/a/ca.pem", "unix:///r.sock"],
)
def test_mask_url_leaves_password_free_urls_readable(url: str) -> None:
    assert mask_url(url) == url


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_a_blank_sidecar_token_is_no_token(clean_env, value: str) -> None:
    clean_env.setenv("SIDECAR_TOKEN", value)
    settings = load_settings()
    assert settings.sidecar_token is None
    assert settings.public_view()["sidecar_token"] is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("", False),
        ("my-host.example", False),
    ],
)
def test_only_loopback_hosts_count_as_local(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_reload_is_refused_only_when_exposed_without_a_token() -> None:
    assert not load_settings(host="127.0.0.1").reload_refused
    assert load_settings(host="0.0.0.0").reload_refused
    assert load_settings(host="0.0.0.0", sidecar_token=" ").reload_refused
    assert not load_settings(host="0.0.0.0", sidecar_token="t").reload_refused


def process_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "SIDECAR_"))}
    return {**env, "WEIGHTS_DIR": str(ROOT / "weights"), **variables}


@pytest.mark.parametrize(("url", "shown"), PASSWORD_URLS)
def test_bales_stream_config_never_prints_the_password(url: str, shown: str) -> None:
    password = f"pw{uuid.uuid4().hex}"
    result = subprocess.run(
        [sys.executable, "-m", "bales_stream", "config"],
        env=process_env(REDIS_URL=url.replace("PW", password)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert password not in result.stdout + result.stderr
    assert f'"redis_url": "{shown}"' in result.stdout


@pytest.mark.parametrize(
    "template", ["redis://bales:{pw}@{hostport}/0", "redis://{hostport}/0?password={pw}"]
)
def test_serve_never_logs_the_password(redis_server, template: str) -> None:
    """A real ``serve`` at debug level, given a password (Redis refuses it for a user, and
    ignores it for the password-less default user): its output until it joined the group or
    logged a Redis error, then until it stopped on SIGTERM, never shows the password."""
    password = f"pw{uuid.uuid4().hex}"
    url = template.format(pw=password, hostport=f"127.0.0.1:{redis_server.port}")
    process = subprocess.Popen(
        [sys.executable, "-m", "bales_stream", "serve"],
        env=process_env(REDIS_URL=url, PORT="0", LOG_LEVEL="debug", KEY_PREFIX=password[:12]),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert process.stderr is not None
    seen: list[str] = []
    try:
        for line in process.stderr:  # one event per line
            seen.append(line)
            if "Redis error" in line or "joined group" in line:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=60)
    output = "".join(seen) + rest
    assert "bales-stream starting: redis=" in output and "****" in output
    assert password not in output
