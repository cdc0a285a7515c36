"""The arq peer of ``benchmarks.peers``: the stub model behind an arq worker, run once per
job.

Tuning: one worker process, ``max_jobs=256`` (as many jobs at once as requests in flight),
``poll_delay=5 ms`` (arq's default of 0.5 s would cap a worker at a few hundred jobs a
second), results kept for 10 minutes. The model runs inline in the job (a ~0.1 ms call:
a hand-off to a thread would cost more than the call). Results are awaited with arq's own
``Job.result`` polling.

Worker: ``python -m benchmarks.peer_arq worker``; driver: ``python -m benchmarks.peer_arq
--redis-url URL`` (prints one JSON line of figures). Runs in the peers' virtualenv (``make
peers-venv``: arq needs redis-py < 6).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import arq
from arq import create_pool
from arq.connections import RedisSettings

from . import peer_lanes

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("PEER_QUEUE", "bench-peer-arq")


async def infer(ctx: dict[str, Any], values: list[float]) -> dict[str, Any]:
    """One request, one model call."""
    return peer_lanes.predict(values)


class WorkerSettings:
    """``arq benchmarks.peer_arq.WorkerSettings``."""

    functions: ClassVar = [infer]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    queue_name = QUEUE
    max_jobs = 256
    poll_delay = 0.005
    keep_result = 600


async def drive(redis_url: str, duration_s: float, in_flight: int, poll_s: float) -> dict[str, Any]:
    """Start a worker, saturate it, stop it; the figures of the run."""
    env = {**os.environ, "PEER_REDIS_URL": redis_url, "PEER_QUEUE": QUEUE}
    worker = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.peer_arq", "worker"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=QUEUE)

    async def call(values: list[float]) -> bool:
        job = await pool.enqueue_job("infer", values)
        assert job is not None
        try:
            await job.result(poll_delay=poll_s)
        except Exception:  # the job raised: an error, as for the other contenders
            return False
        return True

    try:
        await peer_lanes.wait_until_served(call, timeout_s=60)
        return await peer_lanes.saturate(call, in_flight, duration_s)
    finally:
        await pool.aclose()
        peer_lanes.stop_worker(worker)


def run_worker() -> None:
    """The worker, logging warnings only (arq's CLI logs every job at INFO)."""
    logging.basicConfig(level=logging.WARNING)
    arq.run_worker(WorkerSettings)  # type: ignore[arg-type]


def main() -> None:
    if sys.argv[1:] == ["worker"]:
        run_worker()
        return
    args = peer_lanes.parser(__doc__.splitlines()[0]).parse_args()
    peer_lanes.print_figures(
        asyncio.run(drive(args.redis_url, args.duration_s, args.in_flight, args.poll_s))
    )


if __name__ == "__main__":
    main()
