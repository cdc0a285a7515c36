"""Service settings, read once from environment variables into one typed object.

Nothing else in the service reads ``os.environ``. Names and defaults follow BALES
(``REDIS_URL``, ``MAX_BATCH_SIZE``, ...); every setting is listed in README.md and
``.env.example``. An invalid value stops start-up with a message naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from bales_producer import wire
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
MASK = "****"
SECRET_QUERY_PARAMETERS = frozenset({"password", "ssl_password"})
"""URL query parameters redis-py turns into secrets (the AUTH password, the key passphrase)."""


class SettingsError(ValueError):
    """A setting has an invalid value; the message names the environment variable."""


def default_consumer_name() -> str:
    """``<hostname>-<pid>``: unique per process, stable for a container's restarts."""
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """Every setting of the service. Field ``x_y`` is read from variable ``X_Y``, else from
    a line ``X_Y=...`` of ``.env`` in the working directory (the environment wins)."""

    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, env_file=".env"
    )

    redis_url: SecretStr = SecretStr(DEFAULT_REDIS_URL)
    redis_cluster: bool = False
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_window_ms: float = Field(5.0, ge=0, le=10_000)
    adaptive_window: bool = True
    batcher_timeout_s: float = Field(5.0, gt=0, le=86_400)
    default_model_id: str = Field("stub_v1", min_length=1)
    thread_pool_size: int = Field(4, ge=1, le=256)
    intra_op_threads: int = Field(1, ge=1, le=256)
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """The service's event loop: uvloop where it is installed (``auto``), or either one."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["text", "json"] = "text"
    enable_prometheus: bool = True

    key_prefix: str = Field(wire.DEFAULT_PREFIX, pattern=r"^[A-Za-z0-9._-]+$")
    queue_name: str = Field(wire.DEFAULT_QUEUE, pattern=r"^[A-Za-z0-9._-]+$")
    priority_levels: int = Field(wire.DEFAULT_PRIORITY_LEVELS, ge=1, le=16)
    shards: int = Field(1, ge=1, le=1024)
    serve_shards: str = Field("", pattern=r"^[0-9,\s-]*$")
    consumer_group: str = Field("bales", min_length=1)
    consumer_name: str = Field(default_factory=default_consumer_name, min_length=1)
    reply_ttl_s: int = Field(60, ge=1)
    read_block_ms: int = Field(1000, ge=1, le=60_000)
    priority_aging_ms: float = Field(100.0, ge=0)
    max_input_bytes: int = Field(1_048_576, ge=64)
    weights_dir: Path = Path("weights")
    models_config: Path | None = None
    sidecar_token: SecretStr | None = None
    shutdown_grace_s: float = Field(30.0, gt=0)
    claim_idle_ms: int = Field(5000, ge=50)
    max_deliveries: int = Field(3, ge=1)
    trim_interval_s: float = Field(5.0, gt=0)
    dead_consumer_idle_s: float = Field(300.0, ge=1)
    redis_timeout_s: float = Field(5.0, gt=0)

    @property
    def keys(self) -> wire.KeySpace:
        """The Redis key names for this prefix, queue, priority levels and shard count."""
        return wire.KeySpace(self.key_prefix, self.queue_name, self.priority_levels, self.shards)

    @property
    def served_shards(self) -> tuple[int, ...]:
        """The shards this consumer reads: ``SERVE_SHARDS`` (e.g. ``0,2,4-7``), else all."""
        return parse_shards(self.serve_shards, self.shards)

    @property
    def cluster_mode(self) -> bool:
        """Talk to a Redis Cluster: ``REDIS_CLUSTER=true`` or a ``redis+cluster://`` URL."""
        return self.redis_cluster or wire.is_cluster_url(self.redis_url.get_secret_value())

    @model_validator(mode="after")
    def _check_served_shards(self) -> Settings:
        parse_shards(self.serve_shards, self.shards)  # raises ValueError naming the problem
        return self

    @field_validator("sidecar_token", mode="before")
    @classmethod
    def _blank_token_is_no_token(cls, value: object) -> object:
        """An empty or whitespace-only SIDECAR_TOKEN is no token (``SIDECAR_TOKEN=`` in an
        env file must not become a token that an empty bearer header matches)."""
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def reload_refused(self) -> bool:
        """True when the sidecar must refuse reloads: no SIDECAR_TOKEN while HOST binds
        beyond this machine (see ``is_loopback``)."""
        return self.sidecar_token is None and not is_loopback(self.host)

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lowercase_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def redis_url_is_explicit(self) -> bool:
        """True when ``REDIS_URL`` was given (environment, ``.env`` or override), not defaulted."""
        return "redis_url" in self.model_fields_set

    @property
    def redis_url_masked(self) -> str:
        """``REDIS_URL`` with any password replaced by ``****``, for logs."""
        return mask_url(self.redis_url.get_secret_value())

    def public_view(self) -> dict[str, object]:
        """Every setting with secrets masked, for logs and ``bales-stream config``."""
        view = self.model_dump(mode="json")
        view["redis_url"] = self.redis_url_masked
        view["sidecar_token"] = MASK if self.sidecar_token else None
        return view


def parse_shards(spec: str, shards: int) -> tuple[int, ...]:
    """``"0,2,4-7"`` as sorted shard numbers, each below ``shards``; empty means all."""
    if not spec.strip():
        return tuple(range(shards))
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        first, dash, last = part.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise ValueError(f"SERVE_SHARDS item {part!r}: expected a shard number or a range a-b")
        low, high = int(first), int(last) if dash else int(first)
        if not low <= high < shards:
            raise ValueError(
                f"SERVE_SHARDS item {part!r}: shards are numbered 0..{shards - 1} (SHARDS={shards})"
            )
        chosen.update(range(low, high + 1))
    return tuple(sorted(chosen))


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach: ``localhost``, 127.0.0.0/8, ``::1``.
    Any other name counts as reachable from elsewhere (it may resolve to anything)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def mask_url(url: str) -> str:
    """``url`` with every secret replaced by ``****``, the rest left readable: the password
    of the user part (``redis://user:pw@h``, ``redis://:pw@h``, any scheme, including
    ``unix://`` and ``redis+cluster://``) and the values of ``password=`` and
    ``ssl_password=`` query parameters. An ``@`` after the host part means a password with
    a raw ``/``, ``?`` or ``#`` in it (unparseable as meant): then all after the scheme is
    masked."""
    scheme, separator, rest = url.partition("://")
    if not separator:  # not a URL redis-py takes; show it only if it cannot hold a password
        return MASK if "@" in url else url
    parts = urlsplit(url)
    if "@" in rest[len(parts.netloc) :]:
        return f"{scheme}://{MASK}"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = f"{userinfo.partition(':')[0]}:{MASK}"
    masked = f"{scheme}://{userinfo}{at}{hostport}{parts.path}"
    if parts.query:
        masked += "?" + "&".join(_mask_query_item(item) for item in parts.query.split("&"))
    return masked + (f"#{parts.fragment}" if parts.fragment else "")


def _mask_query_item(item: str) -> str:
    name, equals, _ = item.partition("=")
    return f"{name}={MASK}" if equals and unquote(name).lower() in SECRET_QUERY_PARAMETERS else item


def load_settings(**overrides: object) -> Settings:
    """Read the settings from the environment (``overrides`` win); raise ``SettingsError``."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            problems.append(f"{name}={error.get('input')!r}: {error['msg']}")
        raise SettingsError("invalid configuration: " + "; ".join(problems)) from None
