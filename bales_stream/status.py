"""What a consumer says about itself (/health, /ready), and the one policy for a failed
Redis call: count it, mark Redis unreachable, back off (cut short by a stop), and recreate a
consumer group that vanished."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from redis.exceptions import RedisError, ResponseError

from .metrics import Metrics
from .shards import ShardedStreams
from .streams import is_permanent
from .supervisor import Supervisor

log = logging.getLogger(__name__)


@dataclass
class WorkerStatus:
    """What /health and /ready report."""

    models_loaded: bool = False
    group_joined: bool = False
    redis_ok: bool = False
    last_error: str | None = None
    stopping: bool = False
    supervisor: Supervisor | None = None
    standing: dict[str, str] = field(default_factory=dict)
    """Problems that persist until the next success of what raised them, by key (a loop
    failing on a permanent Redis error, a dead-letter stream that refuses records, a fleet
    reload this consumer cannot follow)."""

    def report(self, key: str, problem: str | None) -> None:
        """Set (``problem``) or clear (None) the standing problem ``key``."""
        if problem is None:
            self.standing.pop(key, None)
        elif self.standing.get(key) != problem:
            log.error("%s", problem)
            self.standing[key] = problem

    @property
    def problems(self) -> list[str]:
        """What keeps this consumer from doing its whole job: tasks down or restarting in a
        loop (see ``supervisor``), then the standing problems."""
        tasks = self.supervisor.problems() if self.supervisor is not None else []
        return [*tasks, *self.standing.values()]

    def reasons(self) -> list[str]:
        """Why this consumer is not ready (empty when it is)."""
        return [
            reason
            for reason, failing in (
                ("models not loaded", not self.models_loaded),
                ("consumer group not joined", not self.group_joined),
                (f"Redis unreachable: {self.last_error}", not self.redis_ok),
                ("shutting down", self.stopping),
            )
            if failing
        ] + self.problems

    @property
    def ready(self) -> bool:
        """Ready to take traffic: models loaded, group joined, Redis reachable, every
        long-lived task up."""
        return (
            self.models_loaded
            and self.group_joined
            and self.redis_ok
            and not self.stopping
            and not self.problems
        )


class RedisTrouble:
    """How every loop of a consumer reacts to a failed Redis call."""

    def __init__(
        self,
        status: WorkerStatus,
        metrics: Metrics,
        streams: ShardedStreams,
        stopping: asyncio.Event,
    ) -> None:
        self.status = status
        self.metrics = metrics
        self.streams = streams
        self.stopping = stopping

    async def back_off(self, exc: RedisError, backoff_s: float) -> None:
        """Record ``exc``, then wait ``backoff_s`` (less if a stop is asked)."""
        self.metrics.redis_errors.inc()
        self.status.redis_ok = False
        self.status.last_error = f"{type(exc).__name__}: {exc}"
        log.warning("Redis error (%s); retrying in %.1f s", self.status.last_error, backoff_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(backoff_s):
                await self.stopping.wait()
        if isinstance(exc, ResponseError) and str(exc).startswith("NOGROUP"):
            log.warning("consumer group vanished; recreating it")
            with contextlib.suppress(RedisError):
                await self.streams.ensure_groups()

    def stands(self, key: str, exc: RedisError) -> None:
        """Report ``exc`` as standing problem ``key`` if retrying cannot cure it (e.g. a
        request stream replaced by a key of another type)."""
        if is_permanent(exc):
            self.status.report(key, f"{key} fails on every try ({type(exc).__name__}: {exc})")

    def answered(self, key: str | None = None) -> None:
        """A Redis call succeeded: Redis is reachable (and problem ``key`` is over)."""
        self.status.redis_ok = True
        if key is not None:
            self.status.report(key, None)
