"""Consumer-only throughput: pre-load requests with plain pipelined XADDs, then time how
fast N consumer processes answer them all (no Python producer competing for the cores).

    python -m benchmarks.drain --requests 60000 --consumers 1 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from .fault_harness import Harness
from .faults import xadd_batch


async def drain_once(requests: int, consumers: int) -> float:
    harness = Harness()
    try:
        for first in range(0, requests, 5000):
            await xadd_batch(harness, first, min(5000, requests - first), "d", timeout_ms=600_000)
        for _ in range(consumers):
            await harness.add_consumer()  # returns once /ready; it may have begun already
        started_s = time.perf_counter()
        remaining = sum(await harness.lag_and_pending())
        while any(await harness.lag_and_pending()):
            await asyncio.sleep(0.01)
        return remaining / (time.perf_counter() - started_s)
    finally:
        await harness.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    rates = [asyncio.run(drain_once(args.requests, args.consumers)) for _ in range(args.runs)]
    print(
        f"consumer-only drain, {args.consumers} consumer(s), {args.requests:,} f32 requests: "
        f"median {statistics.median(rates):,.0f} req/s (runs: "
        + ", ".join(f"{r:,.0f}" for r in rates)
        + ")"
    )


if __name__ == "__main__":
    main()
