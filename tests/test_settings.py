"""Settings: the seed's names and defaults, strict parsing, masked secrets."""

from __future__ import annotations

import pytest

from bales_stream.settings import SettingsError, load_settings, mask_url

SEED_DEFAULTS = {
    "redis_url": None,
    "max_batch_size": 32,
    "batch_window_ms": 5.0,
    "batcher_timeout_s": 5.0,
    "default_model_id": "stub_v1",
    "thread_pool_size": 4,
    "port": 8000,
    "log_level": "info",
    "enable_prometheus": True,
    "priority_levels": 3,
    "reply_ttl_s": 60,
    "consumer_group": "bales",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SEED_DEFAULTS:
        monkeypatch.delenv(name.upper(), raising=False)
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
