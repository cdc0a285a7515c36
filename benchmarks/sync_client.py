"""What the synchronous producer client costs: CPU per request in the calling process and the
rate one thread reaches, against one consumer on a private redis-server.

Two ways a thread can use ``bales_producer.Client``:

* ``infer``: one request at a time (submit, then block on its reply);
* ``submit-all``: submit ``--requests`` requests back to back, then collect every reply with
  ``result`` (many in flight from one thread; each submit is still one XADD round trip: the
  sync client has no pipelined submit of many requests).

Run: ``python -m benchmarks.sync_client --rounds 3`` (medians printed).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable

import numpy as np
from bales_producer import Client

from bales_stream.embedded_redis import RedisServer

from .load import Consumers


def infer_one_by_one(client: Client, inputs: list[np.ndarray]) -> None:
    for values in inputs:
        client.infer("stub_v1", values, timeout_s=30)


def submit_all_then_collect(client: Client, inputs: list[np.ndarray]) -> None:
    ids = [client.submit("stub_v1", values, timeout_s=60) for values in inputs]
    for request_id in ids:
        client.result(request_id, timeout_s=60)


MODES: dict[str, Callable[[Client, list[np.ndarray]], None]] = {
    "infer": infer_one_by_one,
    "submit-all": submit_all_then_collect,
}


def measure(url: str, prefix: str, mode: str, count: int) -> dict[str, float]:
    """Requests per second and the client's CPU µs per request of one run."""
    inputs = list(np.random.default_rng(0).standard_normal((count, 128)).astype(np.float32))
    with Client(url, prefix=prefix) as client:
        client.infer("stub_v1", inputs[0], timeout_s=30)  # connected, shard count known
        wall_s, cpu_s = time.perf_counter(), time.process_time()
        MODES[mode](client, inputs)
        wall_s, cpu_s = time.perf_counter() - wall_s, time.process_time() - cpu_s
    return {"req_s": count / wall_s, "cpu_us": cpu_s / count * 1e6}


async def run(args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    server = RedisServer().start()
    prefix = f"bench-sync-{uuid.uuid4().hex[:8]}"
    consumers = Consumers(1, server.url, prefix, {})
    await consumers.start()
    rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    try:
        for n in range(args.rounds):
            for mode in MODES:
                figures = await asyncio.to_thread(measure, server.url, prefix, mode, args.requests)
                rounds[mode].append(figures)
                print(
                    f"  round {n + 1} {mode:<10} {figures['req_s']:8,.0f} req/s  "
                    f"client CPU {figures['cpu_us']:6.1f} µs/req",
                    flush=True,
                )
    finally:
        await consumers.stop()
        server.stop()
    return rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    rounds = asyncio.run(run(args))
    print(f"=== sync client: medians of {args.rounds} rounds, {args.requests} requests each ===")
    for mode, runs in rounds.items():
        req_s = statistics.median(r["req_s"] for r in runs)
        cpu_us = statistics.median(r["cpu_us"] for r in runs)
        print(f"  {mode:<10} {req_s:8,.0f} req/s  client CPU {cpu_us:6.1f} µs/req")


if __name__ == "__main__":
    main()
