"""The Celery peer of ``benchmarks.peers``: the stub model behind a Celery worker with the
Redis broker and the Redis result backend, run once per task.

Tuning (a worker serving a ~0.1 ms model as fast as Celery can): one worker process with the
``solo`` pool (tasks run in the worker's own thread: no hand-off to a child process per
task), ``worker_prefetch_multiplier=256`` (the broker is asked for many messages at a time
rather than one per slot), early acks (Celery's default), JSON for tasks and results.
Results are awaited as the backend publishes them (one pattern subscription to
``celery-task-meta-*``, the channel Celery's own ``AsyncResult.get`` listens on).

Worker: ``celery -A benchmarks.peer_celery worker --pool=solo``; driver: ``python -m
benchmarks.peer_celery --redis-url URL`` (prints one JSON line of figures). Runs in the
peers' virtualenv (``make peers-venv``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from . import peer_lanes

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("PEER_QUEUE", "bench-peer-celery")
POOL_ARGS = os.environ.get("PEER_CELERY_POOL", "--pool=solo").split()

app = Celery("bench_peer", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_default_queue=QUEUE,
    worker_prefetch_multiplier=256,
    result_expires=600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="infer")
def infer(values: list[float]) -> dict[str, Any]:
    """One request, one model call."""
    return peer_lanes.predict(values)


async def drive(redis_url: str, duration_s: float, in_flight: int, poll_s: float) -> dict[str, Any]:
    """Start a worker, saturate it, stop it; the figures of the run."""
    import redis.asyncio as aioredis

    env = {**os.environ, "PEER_REDIS_URL": redis_url, "PEER_QUEUE": QUEUE}
    env["PYTHONWARNINGS"] = "ignore::UserWarning"  # Celery's warning about running as root
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "benchmarks.peer_celery",
            "worker",
            *POOL_ARGS,
            "--loglevel=WARNING",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    results = aioredis.Redis.from_url(redis_url)
    pending: dict[bytes, asyncio.Future[bool]] = {}
    listener = asyncio.create_task(_listen(results, pending))

    async def call(values: list[float]) -> bool:
        task_id = uuid.uuid4().hex
        done = pending[f"celery-task-meta-{task_id}".encode()] = asyncio.Future()
        app.send_task("infer", args=[values], task_id=task_id)
        return await done

    try:
        await peer_lanes.wait_until_served(call, timeout_s=60)
        return await peer_lanes.saturate(call, in_flight, duration_s)
    finally:
        listener.cancel()
        await results.aclose()
        peer_lanes.stop_worker(worker)


async def _listen(results: Any, pending: dict[bytes, asyncio.Future[bool]]) -> None:
    """Resolve each call as the backend publishes its result (one pattern subscription,
    the way Celery's own ``AsyncResult.get`` waits on Redis: no polling)."""
    async with results.pubsub() as pubsub:
        await pubsub.psubscribe("celery-task-meta-*")
        async for message in pubsub.listen():
            if message["type"] != "pmessage":
                continue
            done = pending.pop(message["channel"], None)
            if done is not None and not done.done():
                done.set_result(json.loads(message["data"])["status"] == "SUCCESS")


def main() -> None:
    args = peer_lanes.parser(__doc__.splitlines()[0]).parse_args()
    app.conf.broker_url = app.conf.result_backend = args.redis_url
    peer_lanes.print_figures(
        asyncio.run(drive(args.redis_url, args.duration_s, args.in_flight, args.poll_s))
    )


if __name__ == "__main__":
    main()
