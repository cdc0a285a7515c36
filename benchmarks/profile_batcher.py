"""The isolated batcher benchmark, in BALES's report shape (no Redis in the way).

10,000 requests go through the ``Batcher`` from ``--concurrency`` closed-loop clients (each
puts one request, waits for its result, puts the next: like BALES's load of concurrent
users); batches go through the stub model in the ``InferenceExecutor``; a request's latency
runs from its ``put()`` to its result. Run: ``python -m benchmarks.profile_batcher``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

import numpy as np

from bales_stream.batcher import Batcher
from bales_stream.inference import InferenceExecutor
from bales_stream.models import LoadedModel, builtin_stub

TARGET_RPS = 8_000
TARGET_P99_MS = 12.0


@dataclass(slots=True)
class Item:
    model_id: str
    priority: int
    inputs: np.ndarray
    put_at_s: float
    done: asyncio.Future[None]

    @property
    def batch_key(self) -> str:
        """One batch key per model (no length buckets here)."""
        return self.model_id


async def run_once(
    requests: int, max_batch: int, window_ms: float, threads: int, concurrency: int
) -> dict:
    model: LoadedModel = builtin_stub("stub_v1")
    executor = InferenceExecutor(threads)
    executor.start()
    batcher: Batcher[Item] = Batcher(max_batch, window_ms, aging_ms=100)
    inputs = np.random.default_rng(0).standard_normal((requests, 128)).astype(np.float32)
    latencies_ms: list[float] = []
    batch_sizes: list[int] = []
    slots = asyncio.Semaphore(threads)
    loop = asyncio.get_running_loop()

    async def run_batch(batch: list[Item]) -> None:
        try:
            stacked = np.stack([item.inputs for item in batch])
            await executor.run(model.predict_array, stacked)
            finished_s = time.perf_counter()
            for item in batch:
                latencies_ms.append((finished_s - item.put_at_s) * 1000)
                item.done.set_result(None)
            batch_sizes.append(len(batch))
        finally:
            slots.release()

    async def dispatch() -> None:
        tasks = set()
        while True:
            await slots.acquire()
            task = asyncio.create_task(run_batch(await batcher.next_batch()))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def client(first: int) -> None:
        for i in range(first, requests, concurrency):
            item = Item("stub_v1", i % 3, inputs[i], time.perf_counter(), loop.create_future())
            batcher.put(item)
            await item.done

    started_s = time.perf_counter()
    dispatcher = asyncio.create_task(dispatch())
    await asyncio.gather(*(client(first) for first in range(concurrency)))
    elapsed_s = time.perf_counter() - started_s
    dispatcher.cancel()
    executor.stop()
    latencies_ms.sort()
    return {
        "requests": requests,
        "elapsed_s": elapsed_s,
        "throughput": requests / elapsed_s,
        "p50_ms": latencies_ms[len(latencies_ms) // 2],
        "p99_ms": latencies_ms[int(len(latencies_ms) * 0.99) - 1],
        "avg_batch": statistics.fmean(batch_sizes),
        "model_calls": len(batch_sizes),
    }


def report(result: dict) -> None:
    reduction = result["requests"] / result["model_calls"]
    passed = result["throughput"] > TARGET_RPS and result["p99_ms"] < TARGET_P99_MS
    print("=== Batcher Benchmark ===")
    print(f"Requests:        {result['requests']:,}")
    print(f"Elapsed:         {result['elapsed_s']:.3f} s")
    print(f"Throughput:      {result['throughput']:,.0f} req/s")
    print(f"P50 latency:     {result['p50_ms']:.2f} ms")
    print(f"P99 latency:     {result['p99_ms']:.2f} ms")
    print(f"Avg batch size:  {result['avg_batch']:.1f}")
    print(
        f"Model calls:     {result['model_calls']:,} "
        f"(vs {result['requests']:,} individual = {reduction:.1f}x reduction)"
    )
    print(f"Target:          >{TARGET_RPS:,} req/s, P99 <{TARGET_P99_MS:.0f}ms")
    print(f"Pass:            {'PASS' if passed else 'FAIL'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--window-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight")
    parser.add_argument("--runs", type=int, default=3, help="report the median run")
    args = parser.parse_args()
    results = [
        asyncio.run(
            run_once(args.requests, args.max_batch, args.window_ms, args.threads, args.concurrency)
        )
        for _ in range(args.runs)
    ]
    results.sort(key=lambda r: r["throughput"])
    if args.runs > 1:
        rates = ", ".join(f"{r['throughput']:,.0f}" for r in results)
        print(f"runs (req/s): {rates}; reporting the median run")
    report(results[len(results) // 2])


if __name__ == "__main__":
    main()
