"""What every fault scenario needs: a private Redis, consumer processes, a steady producer,
and the invariant check that makes a scoreboard row (see ``faults`` and ``hostile``)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import redis.asyncio as aioredis
from bales_producer import AsyncClient, KeySpace

from bales_stream.embedded_redis import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
INPUTS = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)


@dataclass
class Row:
    """One line of the scoreboard."""

    scenario: str
    lost: int = 0
    duplicate_replies: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    ok: bool = True

    def line(self) -> str:
        figures = ", ".join(f"{k} {v}" for k, v in self.figures.items())
        verdict = "PASS" if self.ok and self.lost == 0 and self.duplicate_replies == 0 else "FAIL"
        return (
            f"{verdict}  {self.scenario:<34} lost {self.lost:<4} dup-replies "
            f"{self.duplicate_replies:<3} {figures}"
        )


async def wait_ready(port: int, timeout_s: float = 60) -> None:
    """Wait until the sidecar on ``port`` answers /ready with 200."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(timeout_s):
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)


class Consumer:
    """One ``python consumer.py`` process."""

    def __init__(self, redis_url: str, prefix: str, name: str, **env: str) -> None:
        self.port = free_port()
        self.name = name
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "KEY_PREFIX": prefix,
            "CONSUMER_NAME": name,
            "PORT": str(self.port),
            "LOG_LEVEL": "warning",
            "REPLY_TTL_S": "900",
            "CLAIM_IDLE_MS": "1000",
            "REDIS_TIMEOUT_S": "2",
            **env,
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> Consumer:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "consumer.py", cwd=ROOT, env=self.env
        )
        await self.wait_ready()
        return self

    async def wait_ready(self, timeout_s: float = 60) -> None:
        await wait_ready(self.port, timeout_s)

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> int | None:
        if self.alive:
            self.signal(signal.SIGTERM)
        return await self.process.wait() if self.process else None


class Harness:
    """A private Redis (AOF, fsync always), a key space, consumers and a steady producer."""

    def __init__(self) -> None:
        self.redis_server = RedisServer(
            None, None, "--appendonly", "yes", "--appendfsync", "always"
        ).start()
        self.url = self.redis_server.url
        self.prefix = f"f{uuid.uuid4().hex[:8]}"
        self.keys = KeySpace(self.prefix)
        self.redis = aioredis.Redis.from_url(self.url)
        self.consumers: list[Consumer] = []
        self.accepted: list[str] = []

    async def add_consumer(self, **env: str) -> Consumer:
        consumer = await Consumer(self.url, self.prefix, f"c{len(self.consumers)}", **env).start()
        self.consumers.append(consumer)
        return consumer

    async def produce(self, rate: float, duration_s: float, **options: Any) -> None:
        """Submit at a steady ``rate`` for ``duration_s``; remember every accepted id."""
        async with AsyncClient(self.url, prefix=self.prefix) as client:
            start_s = time.perf_counter()
            sent = 0
            while (elapsed_s := time.perf_counter() - start_s) < duration_s:
                due = int(elapsed_s * rate) - sent
                if due > 0:
                    ids = await asyncio.gather(
                        *(
                            client.submit(
                                "stub_v1",
                                INPUTS[(sent + i) % len(INPUTS)],
                                priority=(sent + i) % 3,
                                timeout_s=600,
                                **options,
                            )
                            for i in range(due)
                        ),
                        return_exceptions=True,
                    )
                    self.accepted += [i for i in ids if isinstance(i, str)]
                    sent += due
                await asyncio.sleep(0.005)

    async def answered(self, ids: list[str]) -> int:
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.exists(self.keys.reply(request_id))
            return sum(await pipe.execute())

    async def wait_answered(self, ids: list[str], timeout_s: float = 120) -> float:
        started_s = time.perf_counter()
        async with asyncio.timeout(timeout_s):
            while await self.answered(ids) < len(ids):
                await asyncio.sleep(0.05)
        return time.perf_counter() - started_s

    async def verdict(self, row: Row, ids: list[str] | None = None) -> Row:
        """Check the invariant after the drain: exactly one reply each, lag 0, pending 0."""
        ids = self.accepted if ids is None else ids
        with_timeout = await self._wait_quietly(ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.llen(self.keys.reply(request_id))
            lengths = await pipe.execute()
        row.lost += sum(1 for n in lengths if n == 0)
        row.duplicate_replies += sum(1 for n in lengths if n > 1)
        lag, pending = await self.lag_and_pending()
        row.figures.update({"accepted": len(ids), "lag": lag, "pending": pending})
        row.ok = row.ok and with_timeout and lag == 0 and pending == 0
        return row

    async def _wait_quietly(self, ids: list[str]) -> bool:
        try:
            await self.wait_answered(ids)
        except TimeoutError:
            return False
        try:
            async with asyncio.timeout(60):
                while any(await self.lag_and_pending()):
                    await asyncio.sleep(0.05)
        except TimeoutError:
            return False
        return True

    async def lag_and_pending(self) -> tuple[int, int]:
        lag = pending = 0
        for stream in self.keys.streams:
            for group in await self.redis.xinfo_groups(stream):
                lag += group.get("lag") or 0
                pending += group["pending"]
        return lag, pending

    async def __aenter__(self) -> Harness:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        for consumer in self.consumers:
            await consumer.stop()
        await self.redis.aclose()
        self.redis_server.stop()
