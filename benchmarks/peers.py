"""bales-stream side by side with what a user would otherwise pick, in the same run.

Five contenders serve the same stub model from the same redis-server, under the same
saturating load (``--in-flight`` requests outstanding, JSON inputs of 128 floats):

* ``bales``: bales-stream as configured by default (dynamic batching, MAX_BATCH_SIZE=32);
* ``bales-unbatched``: bales-stream with MAX_BATCH_SIZE=1 (what batching alone is worth);
* ``taskiq``: a taskiq-redis worker (RedisStreamBroker, the model run once per task,
  results in its Redis result backend, awaited with ``wait_result``);
* ``celery``: a Celery worker, Redis broker and result backend (``benchmarks/peer_celery.py``
  says how it is tuned);
* ``arq``: an arq worker (``benchmarks/peer_arq.py``).

Each gets one worker process. Rounds alternate between contenders; medians are printed with
bales-stream's throughput ratio to each. Needs the ``bench`` extra (``pip install -e
'.[bench]'``) and, for Celery and arq, ``make peers-venv`` (their drivers run there).
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
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from taskiq.exceptions import TaskiqResultTimeoutError

from bales_stream.embedded_redis import RedisServer

from . import load, peer_lanes

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
        call = await _call(peer, args.poll_s)
        await peer_lanes.wait_until_served(call, timeout_s=60)
        return await peer_lanes.saturate(call, args.in_flight, args.duration_s)
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


async def _call(peer: Any, poll_s: float) -> Callable[[list[float]], Awaitable[bool]]:
    """One taskiq request, awaited with ``wait_result``: True when it succeeded."""

    async def call(values: list[float]) -> bool:
        task = await peer.infer.kiq(values)
        try:
            result = await task.wait_result(check_interval=poll_s, timeout=30)
        except TaskiqResultTimeoutError:
            return False
        return not result.is_err

    return call


async def run(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    server = RedisServer().start()
    names = ["bales", "bales-unbatched", "taskiq", *peer_lanes.SUBPROCESS_PEERS]
    if not peer_lanes.PEERS_PYTHON.exists():
        print(
            f"  {peer_lanes.PEERS_PYTHON} is missing (make peers-venv): Celery and arq are left out"
        )
        names = names[:3]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        for n in range(args.runs):
            for name in rounds:
                if name == "taskiq":
                    figures = await taskiq(server.url, args)
                elif name in peer_lanes.SUBPROCESS_PEERS:
                    figures = await peer_lanes.subprocess_peer(name, server.url, args)
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
    bales_throughput = medians["bales"]["throughput"]
    print(f"=== peers: medians of {len(rounds['taskiq'])} runs ===")
    for name, figures in medians.items():
        ratio = bales_throughput / figures["throughput"]
        print(f"  {name:<16} {_cells(figures)}  bales-stream x{ratio:5.1f}")


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
