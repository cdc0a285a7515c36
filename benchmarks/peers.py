"""bales-stream side by side with what a user would otherwise pick, in the same run.

Three contenders serve the same stub model from the same redis-server, under the same
saturating load (``--in-flight`` requests outstanding, JSON inputs of 128 floats):

* ``bales``: bales-stream as configured by default (dynamic batching, MAX_BATCH_SIZE=32);
* ``bales-unbatched``: bales-stream with MAX_BATCH_SIZE=1 (what batching alone is worth);
* ``taskiq``: a taskiq-redis worker (RedisStreamBroker, the model run once per task,
  results in its Redis result backend, awaited with ``wait_result``).

Each gets one worker process. Rounds alternate between contenders; medians are printed with
the ratios to the peer. Needs the ``bench`` extra (``pip install -e '.[bench]'``).
Run: ``python -m benchmarks.peers --runs 3``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import statistics
import sys
import time
import uuid
from typing import Any

from taskiq.exceptions import TaskiqResultTimeoutError

from bales_stream.embedded_redis import RedisServer

from . import load

ROOT = load.ROOT


async def bales(redis_url: str, max_batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """One saturating run through bales-stream (one consumer process)."""
    load_args = load.build_parser().parse_args(
        [
            "--mode=saturate",
            "--payload=json",
            "--consumers=1",
            f"--duration-s={args.duration_s}",
            f"--in-flight={args.in_flight}",
            f"--max-batch={max_batch}",
            f"--redis-url={redis_url}",
        ]
    )
    result = await load.run(load_args)
    return {
        "throughput": result["throughput"],
        "p50_ms": result["latency_ms_all"]["p50"],
        "p99_ms": result["latency_ms_all"]["p99"],
        "errors": sum(result["errors"].values()),
    }


async def taskiq(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One saturating run through a taskiq-redis worker."""
    queue = f"bench-peer-{uuid.uuid4().hex[:8]}"
    os.environ.update({"PEER_REDIS_URL": redis_url, "PEER_QUEUE": queue})
    peer = importlib.reload(importlib.import_module("benchmarks.peer_taskiq"))
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskiq",
        "worker",
        "benchmarks.peer_taskiq:broker",
        "--workers=1",
        "--log-level=WARNING",
        cwd=ROOT,
        start_new_session=True,  # its own process group: stopped with its worker children
    )
    await peer.broker.startup()
    try:
        await _wait_for_worker(peer)
        return await _saturate_taskiq(peer, args)
    finally:
        await peer.broker.shutdown()
        await _stop(worker)


async def _stop(worker: asyncio.subprocess.Process, grace_s: float = 5) -> None:
    """SIGTERM the worker's process group; SIGKILL it if it lingers (taskiq's manager can
    take a minute to exit)."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(worker.wait(), grace_s)
    except TimeoutError:
        os.killpg(worker.pid, signal.SIGKILL)
        await worker.wait()


async def _wait_for_worker(peer: Any, timeout_s: float = 60) -> None:
    """The worker's consumer group starts at "$": send probes until one is answered."""
    deadline_s = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline_s:
        task = await peer.infer.kiq([0.0] * 128)
        try:
            await task.wait_result(check_interval=0.05, timeout=2)
            return
        except TaskiqResultTimeoutError:  # the worker is not up yet
            continue
    raise TimeoutError("the taskiq worker did not answer within 60 s")


async def _saturate_taskiq(peer: Any, args: argparse.Namespace) -> dict[str, Any]:
    inputs = load.make_inputs(1024, "json")
    latencies_ms: list[float] = []
    errors = 0
    deadline_s = time.perf_counter() + args.duration_s

    async def lane(lane_id: int) -> None:
        nonlocal errors
        i = lane_id
        while time.perf_counter() < deadline_s:
            sent_s = time.perf_counter()
            task = await peer.infer.kiq(inputs[i % len(inputs)])
            result = await task.wait_result(check_interval=args.poll_s, timeout=30)
            if result.is_err:
                errors += 1
            else:
                latencies_ms.append((time.perf_counter() - sent_s) * 1000)
            i += args.in_flight

    started_s = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(args.in_flight)))
    elapsed_s = time.perf_counter() - started_s
    stats = load.percentiles(latencies_ms)
    return {
        "throughput": len(latencies_ms) / elapsed_s,
        "p50_ms": stats.get("p50", 0.0),
        "p99_ms": stats.get("p99", 0.0),
        "errors": errors,
    }


async def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    server = RedisServer().start()
    rounds: dict[str, list[dict[str, Any]]] = {"bales": [], "bales-unbatched": [], "taskiq": []}
    try:
        for n in range(args.runs):
            for name in rounds:
                if name == "taskiq":
                    figures = await taskiq(server.url, args)
                else:
                    batch = 32 if name == "bales" else 1
                    figures = await bales(server.url, batch, args)
                rounds[name].append(figures)
                print(f"  run {n + 1} {name:<16} {_cells(figures)}", flush=True)
    finally:
        server.stop()
    return rounds


def _cells(figures: dict[str, Any]) -> str:
    return (
        f"{figures['throughput']:9,.0f} req/s  p50 {figures['p50_ms']:7.2f} ms  "
        f"p99 {figures['p99_ms']:7.2f} ms  errors {figures['errors']}"
    )


def report(rounds: dict[str, list[dict[str, Any]]]) -> None:
    """Medians per contender and the ratios to the taskiq peer."""
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in rounds.items()
    }
    peer = medians["taskiq"]["throughput"]
    print(f"=== peers: medians of {len(rounds['taskiq'])} runs ===")
    for name, figures in medians.items():
        print(f"  {name:<16} {_cells(figures)}  x{figures['throughput'] / peer:5.1f} vs taskiq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=8)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument(
        "--poll-s", type=float, default=0.02, help="taskiq wait_result check interval"
    )
    args = parser.parse_args()
    report(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
