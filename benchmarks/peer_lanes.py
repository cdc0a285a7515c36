"""The saturating load every task-queue peer of ``benchmarks.peers`` is measured with.

``--in-flight`` lanes each send one request, await its result and send the next, for
``--duration-s``; the figures are throughput, p50/p99 from send to result, and errors. The
peers run in their own virtualenv (``make peers-venv``: arq and Celery pin a redis-py older
than the service's; the project is installed there too, for the stub model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

from bales_stream.models import STUB_INPUT_SIZE

PEERS_PYTHON = Path(__file__).resolve().parent.parent / ".venv-peers" / "bin" / "python"
"""The peers' virtualenv (``make peers-venv``): arq and Celery need a redis-py older than
the service's."""
SUBPROCESS_PEERS = ("celery", "arq")


_model: list[Any] = []


def predict(values: list[float]) -> dict[str, Any]:
    """The stub's answer to one request (loaded on first use, one torch thread): what every
    peer's task runs, once per request."""
    if not _model:
        import torch

        from bales_stream.models import builtin_stub

        torch.set_num_threads(1)
        _model.append(builtin_stub("stub_v1"))
    result = _model[0].predict_array(np.asarray([values], dtype=np.float32))[0]
    assert result is not None
    return result


def stop_worker(worker: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """SIGTERM a worker's process group; SIGKILL it if it lingers."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


def json_inputs(count: int = 1024) -> list[list[float]]:
    """The same JSON inputs ``benchmarks.load`` sends (seed 0, 128 floats each)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((count, STUB_INPUT_SIZE)).astype(np.float32).tolist()


def figures(latencies_ms: list[float], errors: int, elapsed_s: float) -> dict[str, Any]:
    """Throughput, p50 and p99 of one run."""
    array = np.asarray(latencies_ms or [0.0])
    return {
        "throughput": len(latencies_ms) / elapsed_s,
        "p50_ms": float(np.percentile(array, 50)),
        "p99_ms": float(np.percentile(array, 99)),
        "errors": errors,
    }


async def saturate(
    call: Callable[[list[float]], Awaitable[bool]], in_flight: int, duration_s: float
) -> dict[str, Any]:
    """Run ``in_flight`` lanes of ``call`` (True when the result is good) for ``duration_s``."""
    inputs = json_inputs()
    latencies_ms: list[float] = []
    errors = 0
    deadline_s = time.perf_counter() + duration_s

    async def lane(lane_id: int) -> None:
        nonlocal errors
        i = lane_id
        while time.perf_counter() < deadline_s:
            sent_s = time.perf_counter()
            if await call(inputs[i % len(inputs)]):
                latencies_ms.append((time.perf_counter() - sent_s) * 1000)
            else:
                errors += 1
            i += in_flight

    started_s = time.perf_counter()
    await asyncio.gather(*(lane(i) for i in range(in_flight)))
    return figures(latencies_ms, errors, time.perf_counter() - started_s)


async def wait_until_served(
    call: Callable[[list[float]], Awaitable[bool]], timeout_s: float
) -> None:
    """Send probes until one is answered (a worker's queue may start after its process)."""
    deadline_s = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline_s:
        try:
            if await asyncio.wait_for(call([0.0] * STUB_INPUT_SIZE), 2):
                return
        except TimeoutError:
            continue
    raise TimeoutError(f"the peer's worker did not answer within {timeout_s:.0f} s")


async def subprocess_peer(name: str, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """One saturating run of ``benchmarks.peer_<name>`` in the peers' virtualenv (from any
    virtualenv: the driver runs as a child process)."""
    driver = await asyncio.create_subprocess_exec(
        str(PEERS_PYTHON),
        "-m",
        f"benchmarks.peer_{name}",
        f"--redis-url={redis_url}",
        f"--duration-s={args.duration_s}",
        f"--in-flight={args.in_flight}",
        f"--poll-s={args.poll_s}",
        cwd=PEERS_PYTHON.parents[2],
        env={**os.environ, "PEER_QUEUE": f"bench-peer-{uuid.uuid4().hex[:8]}"},
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await driver.communicate()
    if driver.returncode != 0:
        raise RuntimeError(f"the {name} peer failed (exit {driver.returncode})")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


def parser(description: str) -> argparse.ArgumentParser:
    """The options every peer driver takes."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("--redis-url", required=True)
    out.add_argument("--duration-s", type=float, default=8)
    out.add_argument("--in-flight", type=int, default=256)
    out.add_argument("--poll-s", type=float, default=0.02, help="result check interval")
    return out


def print_figures(result: dict[str, Any]) -> None:
    """The driver's one line of output, read by ``benchmarks.peers``."""
    print(json.dumps(result), flush=True)
