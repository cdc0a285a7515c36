"""Two versions of the service against one backlog: throughput and CPU per request, A/B.

Each contender is a checkout of this repository (a ``git worktree`` of another commit, or
this one) with optional settings, e.g. ``/tmp/before`` and ``.|THREAD_POOL_SIZE=1``. Every
round, each contender in turn (the order flips every round) gets ``--consumers`` fresh
consumer processes on one private redis-server (no persistence), ``--requests`` pre-encoded
``f32`` XADDs written at once on a raw socket (``benchmarks.vs_floor``), and is timed until
every entry is acked. Printed per round and as medians: requests/s, and CPU microseconds per
request of the consumers and of redis-server. On a shared machine only the ratios within one
run mean much.

    git worktree add /tmp/before HEAD~3
    python -m benchmarks.ab_drain /tmp/before . --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from bales_stream.embedded_redis import RedisServer, free_port

from . import floor, vs_floor
from .fault_harness import wait_ready
from .faults import cpu_seconds

POLL_S = 0.005


@dataclass(frozen=True)
class Contender:
    """A checkout of the service and the settings it runs with."""

    root: Path
    env: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> Contender:
        """``path`` or ``path|NAME=value NAME=value``."""
        path, _, settings = text.partition("|")
        env = dict(item.split("=", 1) for item in settings.split())
        return cls(Path(path).resolve(), env)

    def __str__(self) -> str:
        settings = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{self.root}{' ' + settings if settings else ''}"


async def drain(contender: Contender, url: str, redis_pid: int, args: argparse.Namespace) -> tuple:
    """One round of one contender: (requests/s, consumers' µs/request, redis µs/request)."""
    prefix = f"ab{uuid.uuid4().hex[:8]}"
    ports = [free_port() for _ in range(args.consumers)]
    root = contender.root
    base = {**os.environ, "REDIS_URL": url, "KEY_PREFIX": prefix, "LOG_LEVEL": "warning"}
    base["PYTHONPATH"] = f"{root}{os.pathsep}{root / 'producers'}"
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "consumer.py", cwd=root, env={**base, **contender.env, "PORT": str(p)}
        )
        for p in ports
    ]
    redis = aioredis.Redis.from_url(url)
    writer = await vs_floor.RawWriter.open(url)
    try:
        for port in ports:
            await wait_ready(port)
        commands = vs_floor.xadd_commands(prefix, "ab", args.requests)
        cpu_before = sum(cpu_seconds(p.pid) for p in processes), cpu_seconds(redis_pid)
        started_s = time.perf_counter()
        await writer.send(commands)
        while writer.replies < args.requests or await busy(redis, floor.streams(prefix)):
            await asyncio.sleep(POLL_S)
        elapsed_s = time.perf_counter() - started_s
        consumers_s = sum(cpu_seconds(p.pid) for p in processes) - cpu_before[0]
        redis_s = cpu_seconds(redis_pid) - cpu_before[1]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            await process.wait()
        await writer.close()
        await redis.unlink(*floor.streams(prefix))
        await redis.aclose()
    per_request_us = 1e6 / args.requests
    return args.requests / elapsed_s, consumers_s * per_request_us, redis_s * per_request_us


async def busy(redis: aioredis.Redis, streams: list[str]) -> int:
    """Entries not yet delivered or not yet acked, over the streams."""
    total = 0
    for stream in streams:
        for group in await redis.xinfo_groups(stream):
            total += (group["lag"] or 0) + group["pending"]
    return total


async def run(args: argparse.Namespace) -> dict[str, list[tuple]]:
    """Alternate the contenders for ``--rounds`` rounds; print each round as it ends."""
    contenders = [Contender.parse(text) for text in args.contenders]
    server = RedisServer().start()
    results: dict[str, list[tuple]] = {str(c): [] for c in contenders}
    try:
        admin = aioredis.Redis.from_url(server.url)
        redis_pid = int((await admin.info("server"))["process_id"])
        await admin.aclose()
        for round_number in range(1, args.rounds + 1):
            order = contenders if round_number % 2 else contenders[::-1]
            for contender in order:
                figures = await drain(contender, server.url, redis_pid, args)
                results[str(contender)].append(figures)
                print(f"  round {round_number} {contender}: {line(figures)}", flush=True)
    finally:
        server.stop()
    return results


def line(figures: tuple) -> str:
    rate, consumers_us, redis_us = figures
    return f"{rate:,.0f} req/s, consumers {consumers_us:.1f} µs/req, redis {redis_us:.1f} µs/req"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contenders", nargs="+", help="checkout path, optionally '|NAME=value'")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=60_000)
    args = parser.parse_args()
    results = asyncio.run(run(args))
    print(f"### medians of {args.rounds} rounds, {args.consumers} consumers, {args.requests:,}")
    for name, rounds in results.items():
        medians = tuple(statistics.median(r[i] for r in rounds) for i in range(3))
        print(f"{name}: {line(medians)}")


if __name__ == "__main__":
    main()
