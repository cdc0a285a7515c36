"""p0 latency with a saturating p2 backlog, against the same system idle.

One consumer process and one redis-server. Phase "idle": p0 requests at a steady open-loop
``--rate`` (latency from each request's intended send time). Phase "backlog": first
``--backlog`` p2 requests are enqueued at once (more than the consumer can answer during
the phase: checked at its end), then the same p0 load runs again. The priority rule lets
p0 overtake the queue, so its p99 should stay within 2x of the idle one (the target).

    python -m benchmarks.priority --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import uuid

import numpy as np
import redis.asyncio as aioredis
from bales_producer import AsyncClient, KeySpace

from bales_stream.embedded_redis import RedisServer

from . import load

TARGET_RATIO = 2.0


async def p0_latencies(client: AsyncClient, args: argparse.Namespace) -> dict[str, float]:
    """Open-loop p0 load; the percentiles of its latencies."""
    load_args = load.build_parser().parse_args(
        ["--mode=open", f"--rate={args.rate}", f"--duration-s={args.duration_s}", "--mix=1,0,0"]
    )
    results = load.Results()
    await load.open_loop(client, load_args, results)
    if results.errors:
        raise RuntimeError(f"p0 requests failed: {results.errors}")
    return load.percentiles(results.latencies_ms[0])


async def enqueue_backlog(redis: aioredis.Redis, keys: KeySpace, count: int) -> None:
    """``count`` p2 requests, enqueued with plain pipelined XADDs (nobody waits for them)."""
    payload = np.random.default_rng(1).standard_normal(128).astype(np.float32).tobytes()
    for first in range(0, count, 10_000):
        async with redis.pipeline(transaction=False) as pipe:
            for i in range(first, min(first + 10_000, count)):
                pipe.xadd(
                    keys.stream(2),
                    {
                        "request_id": f"bg-{i}",
                        "model_id": "stub_v1",
                        "encoding": "f32",
                        "input": payload,
                        "timeout_ms": "600000",
                    },
                )
            await pipe.execute()


async def p2_lag(redis: aioredis.Redis, keys: KeySpace) -> int:
    """p2 entries not yet delivered to the group."""
    groups = await redis.xinfo_groups(keys.stream(2))
    return int(groups[0]["lag"] or 0) if groups else 0


async def run_once(args: argparse.Namespace) -> dict[str, float]:
    server = RedisServer().start()
    prefix = f"prio{uuid.uuid4().hex[:8]}"
    keys = KeySpace(prefix)
    consumers = load.Consumers(1, server.url, prefix, {})
    redis = aioredis.Redis.from_url(server.url)
    try:
        await consumers.start()
        async with AsyncClient(server.url, prefix=prefix) as client:
            await client.infer("stub_v1", [0.0] * 128)  # warm-up
            idle = await p0_latencies(client, args)
            await enqueue_backlog(redis, keys, args.backlog)
            busy = await p0_latencies(client, args)
            left = await p2_lag(redis, keys)
    finally:
        await redis.aclose()
        await consumers.stop()
        server.stop()
    if left == 0:
        raise RuntimeError("the p2 backlog ran dry during the phase: raise --backlog")
    return {
        "idle_p50": idle["p50"],
        "idle_p99": idle["p99"],
        "backlog_p50": busy["p50"],
        "backlog_p99": busy["p99"],
        "p2_left": left,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200, help="p0 requests per second")
    parser.add_argument("--duration-s", type=float, default=5)
    parser.add_argument("--backlog", type=int, default=400_000, help="p2 requests enqueued")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    runs = []
    for n in range(args.runs):
        figures = asyncio.run(run_once(args))
        runs.append(figures)
        print(
            f"  run {n + 1}: p0 idle p50 {figures['idle_p50']:.2f} / p99 {figures['idle_p99']:.2f}"
            f" ms; under p2 backlog p50 {figures['backlog_p50']:.2f} / p99"
            f" {figures['backlog_p99']:.2f} ms ({figures['p2_left']:,.0f} p2 still queued)",
            flush=True,
        )
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    ratio = median["backlog_p99"] / median["idle_p99"]
    verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
    print(
        f"=== p0 at {args.rate:,.0f} req/s, medians of {args.runs}: idle p99"
        f" {median['idle_p99']:.2f} ms, with a saturating p2 backlog p99"
        f" {median['backlog_p99']:.2f} ms = {ratio:.2f}x (target <= {TARGET_RATIO:.0f}x) {verdict}"
    )


if __name__ == "__main__":
    main()
